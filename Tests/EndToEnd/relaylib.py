"""Helpers for the progress-relay end-to-end suite.

Everything here talks to a real `progress-relay` process from the outside: the Unix ingest
socket, HTTP, WebSocket (through the `websockets` client, or a hand-written raw client for
protocol-level tests) and the command line. Standard library plus `websockets` only.

The fixtures that use these helpers live in conftest.py; tests import the helpers from here.

Unprivileged by default: when the tests run as root (as CI does), every relay process, and every
command run through `run_cli`, runs as RELAY_UID:RELAY_GID, an id no user or group on the machine
has, without supplementary groups or capabilities (`unprivileged_prefix()`, through setpriv), in a
directory that user owns (`give_to_relay_user`, `write_secret`). The test process keeps root: it
can still read, connect to and signal whatever the relay makes. As any other user, the relay runs
as that user and nothing changes. A test that needs the relay to run as root sets
`relay.unprivileged = False` (or passes `as_root=True` to run_cli) and says why in a comment.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import errno
import functools
import grp
import hashlib
import hmac
import http.client
import inspect
import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any, Iterable

import websockets
from websockets.asyncio.client import connect as _ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus  # noqa: F401  (re-exported)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEFAULT_BIN = REPO / ".build" / "debug" / "progress-relay"


def relay_bin() -> str:
    return os.environ.get("PROGRESS_RELAY_BIN") or str(DEFAULT_BIN)


def require_bin() -> str:
    path = relay_bin()
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise RuntimeError(
            f"relay binary not found at {path} (build it with `swift build`, "
            "or point PROGRESS_RELAY_BIN at it)"
        )
    return path


# --------------------------------------------------------------------------------------------
# unprivileged by default

def _unused_id(first: int = 61000, last: int = 61999) -> int:
    """The first id in [first, last] that is neither a user's uid nor a group's gid here."""
    for n in range(first, last + 1):
        try:
            pwd.getpwuid(n)
            continue
        except KeyError:
            pass
        try:
            grp.getgrgid(n)
            continue
        except KeyError:
            return n
    raise RuntimeError(f"no id in {first}..{last} is free of users and groups: "
                       "the relay's unprivileged user needs one")


# The uid and gid of every relay process when the tests run as root: known to no passwd or group
# entry (checked here, at import, by _unused_id), so the relay owns nothing but what a test gives
# it and is in no group that could reach anything else.
RELAY_UID = RELAY_GID = _unused_id()


def drops_privileges() -> bool:
    """True when the relay processes run as RELAY_UID:RELAY_GID (the tests run as root)."""
    return os.geteuid() == 0


def _unreachable_reason(path: str | os.PathLike, *, execute: bool = False) -> str | None:
    """Why RELAY_UID cannot reach `path` (search every directory on the way; with execute=True,
    execute the file itself), or None. RELAY_UID owns nothing outside a test's directories and is
    in no group, so the "other" bits decide, except on what it owns."""
    p = Path(os.path.abspath(path))
    parts = [*reversed(p.parents)]
    for d in parts:
        st = os.stat(d)
        if st.st_uid == RELAY_UID:
            continue
        if not st.st_mode & stat.S_IXOTH:
            return f"{d} (mode {stat.filemode(st.st_mode)}, owner {st.st_uid}) is not searchable"
    if execute:
        st = os.stat(p)
        if st.st_uid != RELAY_UID and not st.st_mode & stat.S_IXOTH:
            return f"{p} (mode {stat.filemode(st.st_mode)}) is not executable by others"
    return None


@functools.lru_cache(maxsize=None)
def _setpriv_prefix(binary: str) -> tuple[str, ...]:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise RuntimeError("the tests run as root and run the relay unprivileged through "
                           "setpriv, which is missing: apt-get install util-linux")
    why = _unreachable_reason(binary, execute=True)
    if why:
        raise RuntimeError(f"the relay binary {binary} cannot be run by uid {RELAY_UID}, "
                           f"as the tests run it when they run as root: {why}")
    return (setpriv, f"--reuid={RELAY_UID}", f"--regid={RELAY_GID}", "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--")


def unprivileged_prefix() -> list[str]:
    """What to put before a relay command so that it runs as RELAY_UID:RELAY_GID with no
    supplementary group and no capability (none permitted, inheritable, ambient or in the bounding
    set; no_new_privs). Empty when the tests do not run as root: then the relay runs as the user
    who runs the tests. setpriv execs the command, so the process keeps its pid (LISTEN_PID,
    signals and /proc/PID still name the relay)."""
    if not drops_privileges():
        return []
    return list(_setpriv_prefix(relay_bin()))


def assert_unprivileged(pid: int) -> None:
    """When the tests run as root: process `pid` runs as RELAY_UID:RELAY_GID, in no other group,
    with no capability at all and no_new_privs set (what unprivileged_prefix() asks for)."""
    if not drops_privileges():
        return
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            fields[k] = v.split()
    want = {
        "Uid": [str(RELAY_UID)] * 4, "Gid": [str(RELAY_GID)] * 4, "Groups": [],
        **{c: ["0000000000000000"] for c in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")},
        "NoNewPrivs": ["1"],
    }
    got = {k: fields.get(k) for k in want}
    assert got == want, f"process {pid} is not the unprivileged relay user: {got}"


def _within_a_temporary_directory(p: Path) -> bool:
    roots = {Path("/tmp").resolve(), Path(tempfile.gettempdir()).resolve()}
    p = p.resolve()
    return any(p != r and r in p.parents for r in roots)


def give_to_relay_user(*paths: str | os.PathLike) -> None:
    """Make each path (a directory with everything in it, or a file) owned by RELAY_UID:RELAY_GID,
    as if the relay's user had made it: a test's temporary directory, the secret, key and state
    files it writes there, a notify socket the relay must send to. Modes stay as they are
    (mkdtemp's 0700 directories, 0600 secrets). Only below /tmp (or $TMPDIR): never a directory of
    the repository or of the machine. Does nothing when the tests do not run as root."""
    if not drops_privileges():
        return
    for path in paths:
        p = Path(path)
        if not _within_a_temporary_directory(p):
            raise ValueError(f"give_to_relay_user: {p} is not inside a temporary directory")
        why = _unreachable_reason(p)
        if why:
            raise RuntimeError(f"{p} is not reachable for the relay's user (uid {RELAY_UID}): "
                               f"{why}; use short_tmpdir() for the relay's directories")
        os.chown(p, RELAY_UID, RELAY_GID, follow_symlinks=False)
        if p.is_dir() and not p.is_symlink():
            for root, dirs, files in os.walk(p):
                for name in dirs + files:
                    os.chown(os.path.join(root, name), RELAY_UID, RELAY_GID,
                             follow_symlinks=False)


def write_secret(path: str | os.PathLike, data: bytes | str, mode: int = 0o600) -> str:
    """Write a secret (or key) file as a careful operator does: mode 0600, owned by the relay's
    user (when the tests run as root; else by the user who runs them). Returns the path."""
    if isinstance(data, str):
        data = data.encode()
    path = str(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)
    give_to_relay_user(path)
    return path


# --------------------------------------------------------------------------------------------
# small utilities

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def short_tmpdir(prefix: str = "pr-") -> Path:
    # Unix socket paths are limited to 107 bytes: pytest's tmp_path can be too long.
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def wait_until(pred, timeout: float, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def async_wait_until(pred, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if inspect.isawaitable(v):
            v = await v
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def async_test(fn=None, *, timeout: float = 60):
    """Run an `async def` test with asyncio.run (no pytest-asyncio), with an overall timeout.

    Usable as `@async_test` or `@async_test(timeout=...)`."""

    def deco(f):
        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            async def main():
                try:
                    return await asyncio.wait_for(f(*args, **kwargs), timeout)
                finally:
                    for ws in list(_OPEN_WS):
                        try:
                            ws.transport.abort()
                        except Exception:
                            pass
                    _OPEN_WS.clear()

            return asyncio.run(main())

        return wrapper

    if fn is not None:
        return deco(fn)
    return deco


# --------------------------------------------------------------------------------------------
# JWT (HS256/384/512) with the standard library

def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


_HASHES = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}


def mint_jwt(secret: bytes | str, claims: dict, alg: str = "HS256", *, header: dict | None = None,
             sign_alg: str | None = None) -> str:
    """A compact JWS. `alg` goes in the header; `sign_alg` (default: alg) says how to sign
    ("none" for an empty signature), so that header and signature can disagree on purpose."""
    if isinstance(secret, str):
        secret = secret.encode()
    hdr = {"alg": alg, "typ": "JWT"}
    if header:
        hdr.update(header)
    signing_input = (
        b64url(json.dumps(hdr, separators=(",", ":")).encode())
        + "."
        + b64url(json.dumps(claims, separators=(",", ":")).encode())
    )
    sign_alg = sign_alg or alg
    if sign_alg == "none":
        sig = ""
    else:
        sig = b64url(hmac.new(secret, signing_input.encode(), _HASHES[sign_alg]).digest())
    return signing_input + "." + sig


def decode_jwt(token: str) -> tuple[dict, dict, bytes]:
    h, p, s = token.split(".")
    return json.loads(b64url_decode(h)), json.loads(b64url_decode(p)), b64url_decode(s)


def verify_hs(token: str, secret: bytes | str, alg: str = "HS256") -> bool:
    if isinstance(secret, str):
        secret = secret.encode()
    h, p, s = token.split(".")
    want = hmac.new(secret, f"{h}.{p}".encode(), _HASHES[alg]).digest()
    return hmac.compare_digest(want, b64url_decode(s))


# --------------------------------------------------------------------------------------------
# the relay process

_STARTED: list["Relay"] = []   # relays started during the current test (for failure reports)


class RelayStartError(AssertionError):
    pass


def _retry_busy(fn, timeout: float = 20.0):
    """Run fn, retrying while the binary is being rewritten (ETXTBSY during a rebuild)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except OSError as e:
            if e.errno != errno.ETXTBSY or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class Relay:
    """One real `progress-relay serve` process in its own temporary directory."""

    def __init__(self, extra_args: Iterable[str] = (), *, env: dict | None = None,
                 secret: str | None = None, workdir: Path | None = None, name: str = "relay",
                 flags: bool = True):
        """flags=False: run `serve` with extra_args only (no --socket/--listen/--jwt-secret-file/
        --log-level), e.g. to give them through the environment instead."""
        self.bin = require_bin()
        self.flags = flags
        self.name = name
        self.dir = Path(workdir) if workdir else short_tmpdir()
        self._own_dir = workdir is None
        # The relay's own directory: its user owns it and writes there (socket, state file).
        give_to_relay_user(self.dir)
        self.socket_path = str(self.dir / "p.sock")
        self.port = free_port()
        self.secret = secret if secret is not None else secrets.token_hex(32)
        self.secret_file = str(self.dir / "secret")
        # one trailing newline: the contract says it is stripped; 0600, the relay user's
        write_secret(self.secret_file, self.secret + "\n")
        self.extra_args = list(extra_args)
        self.env = dict(os.environ)
        for k in list(self.env):
            if k.startswith("PROGRESS_RELAY_") and k != "PROGRESS_RELAY_BIN":
                del self.env[k]
        self.env.update(env or {})
        self.log_path = self.dir / f"{name}-stderr.log"
        self.stdout_path = self.dir / f"{name}-stdout.log"
        self.proc: subprocess.Popen | None = None
        # for socket activation: a wrapper to put before args, and extra Popen arguments
        # (the wrapper runs as the test's user and execs the privilege drop, then the relay)
        self.launch_prefix: list[str] = []
        self.popen_kwargs: dict = {}
        # as RELAY_UID:RELAY_GID without capabilities when the tests run as root; a test that
        # needs a relay running as root sets this to False and says why ("# needs root: ...")
        self.unprivileged = True
        self.starts = 0
        self.last_exit: int | None = None
        _STARTED.append(self)

    # -- process control ---------------------------------------------------------------------

    @property
    def args(self) -> list[str]:
        if not self.flags:
            return [self.bin, "serve", *self.extra_args]
        return [
            self.bin, "serve",
            "--socket", self.socket_path,
            "--listen", f"127.0.0.1:{self.port}",
            "--jwt-secret-file", self.secret_file,
            "--log-level", "debug",
            *self.extra_args,
        ]

    @property
    def command(self) -> list[str]:
        """The whole command line start() runs: launch_prefix, the privilege drop, args."""
        drop = unprivileged_prefix() if self.unprivileged else []
        return self.launch_prefix + drop + self.args

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> "Relay":
        self.starts += 1
        with open(self.log_path, "ab") as f:
            f.write(f"===== start #{self.starts}: {' '.join(self.command)}\n".encode())
        self._stderr = open(self.log_path, "ab")
        self._stdout = open(self.stdout_path, "ab")
        command = self.command
        self.proc = _retry_busy(lambda: subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=self._stdout,
            stderr=self._stderr, env=self.env, cwd=self.dir, **self.popen_kwargs))
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 15.0):
        deadline = time.monotonic() + timeout
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise RelayStartError(
                    f"relay exited with status {rc} before it was ready\n{self.log_tail()}")
            if os.path.exists(self.socket_path):
                try:
                    status, _ = self.http("/healthz", timeout=1)
                    if status == 200:
                        if self.unprivileged:
                            assert_unprivileged(self.proc.pid)
                        return
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise RelayStartError(
                    f"relay not ready after {timeout}s (GET /healthz = 200 and socket file)\n"
                    f"{self.log_tail()}")
            time.sleep(0.02)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send_signal(self, sig) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        self._close_files()
        self.last_exit = rc
        return rc

    def stop(self, sig=signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """SIGTERM (by default), then SIGKILL after `timeout` s. Returns the exit code
        (negative for a signal, as subprocess reports it)."""
        if self.proc is None:
            return self.last_exit
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        rc = self.proc.returncode
        self.last_exit = rc
        self._close_files()
        return rc

    def kill(self) -> int:
        return self.stop(sig=signal.SIGKILL, timeout=5)

    def restart(self, timeout: float = 15.0) -> "Relay":
        self.stop()
        self.start(timeout)
        return self

    def run_to_exit(self, timeout: float = 10.0) -> subprocess.CompletedProcess:
        """Run the relay's command when it is expected to refuse to start: wait for its exit and
        return status, stdout and stderr (stderr is also added to the relay's log, for failure
        reports). Fails, after stopping it, when it still runs after `timeout` s: it started."""
        self.starts += 1
        command = self.command
        with open(self.log_path, "ab") as f:
            f.write(f"===== start #{self.starts} (expected to refuse): {' '.join(command)}\n"
                    .encode())
        proc = _retry_busy(lambda: subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=self.env, cwd=self.dir, **self.popen_kwargs))
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                out, err = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate(timeout=5)
            with open(self.log_path, "ab") as f:
                f.write(err)
            raise AssertionError(f"the relay did not refuse to start: still running after "
                                 f"{timeout}s (then stopped: status {proc.returncode})\n"
                                 f"stderr: {err.decode('utf-8', 'replace')[-3000:]}")
        with open(self.log_path, "ab") as f:
            f.write(err)
        self.last_exit = proc.returncode
        return subprocess.CompletedProcess(command, proc.returncode, out, err)

    def _close_files(self):
        for f in ("_stderr", "_stdout"):
            fh = getattr(self, f, None)
            if fh and not fh.closed:
                fh.close()

    def cleanup(self):
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def log_text(self) -> str:
        try:
            return self.log_path.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, max_chars: int = 20000) -> str:
        t = self.log_text()
        if len(t) > max_chars:
            t = "...\n" + t[-max_chars:]
        return f"----- {self.name} stderr ({self.log_path}) -----\n{t}"

    # -- HTTP ----------------------------------------------------------------------------------

    def http(self, path: str, method: str = "GET", headers: dict | None = None,
             timeout: float = 5.0) -> tuple[int, str]:
        status, _, body = self.http_full(path, method, headers, timeout)
        return status, body

    def http_full(self, path: str, method: str = "GET", headers: dict | None = None,
                  timeout: float = 5.0) -> tuple[int, dict, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, headers=headers or {})
            resp = conn.getresponse()
            body = resp.read().decode("utf-8", "replace")
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
        finally:
            conn.close()

    def stats(self) -> dict:
        status, body = self.http("/stats")
        assert status == 200, (status, body)
        return json.loads(body)

    def metrics(self) -> str:
        status, body = self.http("/metrics")
        assert status == 200, (status, body)
        return body

    # -- tokens --------------------------------------------------------------------------------

    def token(self, sub: str | None = "u1", topics: list[str] | None = None,
              exp_in: float | None = 3600, alg: str = "HS256", *, nbf_in: float | None = None,
              secret: str | bytes | None = None, header: dict | None = None,
              sign_alg: str | None = None, **extra_claims) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {}
        if sub is not None:
            claims["sub"] = sub
        if topics is not None:
            claims["topics"] = list(topics)
        claims["iat"] = now
        if exp_in is not None:
            claims["exp"] = int(now + exp_in)
        if nbf_in is not None:
            claims["nbf"] = int(now + nbf_in)
        claims.update(extra_claims)
        return mint_jwt(self.secret if secret is None else secret, claims, alg,
                        header=header, sign_alg=sign_alg)

    # -- ingest --------------------------------------------------------------------------------

    def emit_lines(self, lines: Iterable[bytes | str | dict], read_answers: bool = True,
                   timeout: float = 10.0) -> list[dict]:
        """Send each line (a "\\n" is added where a line has no line end; dicts are JSON-encoded),
        half-close, read the answers until EOF and return them parsed."""
        data = b"".join(_as_line(l) for l in lines)
        return self.emit_raw(data, read_answers=read_answers, timeout=timeout)

    def emit_raw(self, data: bytes, read_answers: bool = True, timeout: float = 10.0) -> list[dict]:
        """Send exactly `data`, half-close, and (by default) read answers until EOF."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(self.socket_path)
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            if not read_answers:
                return []
            raw = _read_to_eof(s, timeout,
                               "the relay did not close the ingest connection after the "
                               "emitter's end-of-file")
        finally:
            s.close()
        return parse_answers(raw)

    async def aemit(self, lines, read_answers: bool = True, timeout: float = 10.0) -> list[dict]:
        """emit_lines in a thread, so that WebSocket clients of the same test keep reading."""
        return await asyncio.to_thread(self.emit_lines, lines, read_answers, timeout)

    async def aemit_raw(self, data: bytes, read_answers: bool = True, timeout: float = 10.0):
        return await asyncio.to_thread(self.emit_raw, data, read_answers, timeout)


def _as_line(l) -> bytes:
    if isinstance(l, dict):
        l = json.dumps(l, separators=(",", ":"))
    if isinstance(l, str):
        l = l.encode("utf-8")
    if not l.endswith(b"\n"):
        l += b"\n"
    return l


def _read_to_eof(s: socket.socket, timeout: float, what: str) -> bytes:
    chunks = []
    deadline = time.monotonic() + timeout
    while True:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            b = s.recv(65536)
        except socket.timeout:
            raise AssertionError(f"{what} within {timeout}s; read so far: {b''.join(chunks)!r}")
        except ConnectionResetError:
            break
        if not b:
            break
        chunks.append(b)
    return b"".join(chunks)


def parse_answers(raw: bytes) -> list[dict]:
    if not raw:
        return []
    assert raw.endswith(b"\n"), f"ingest answer not newline-terminated: {raw!r}"
    out = []
    for line in raw.split(b"\n")[:-1]:
        try:
            out.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"ingest answer line is not JSON: {line!r}")
    return out


def assert_error_answers(answers: list[dict], lines: list[int]):
    """Exactly one answer per rejected line, `{"error": <non-empty string>, "line": n}`."""
    got = [a.get("line") for a in answers]
    assert got == lines, f"answers for lines {got}, expected {lines}: {answers}"
    for a in answers:
        assert set(a) == {"error", "line"}, a
        assert isinstance(a["error"], str) and a["error"], a
        assert isinstance(a["line"], int) and not isinstance(a["line"], bool), a


# --------------------------------------------------------------------------------------------
# WebSocket client (websockets)

_OPEN_WS: list = []
_DEFAULT = object()


def ws_url(relay: Relay, token=None, topics: Iterable[str] = (), extra_query=()) -> str:
    q: list[tuple[str, str]] = []
    if token is not None:
        q.append(("token", token))
    for t in topics:
        q.append(("topic", t))
    q.extend(extra_query)
    return relay.url + (("?" + urllib.parse.urlencode(q)) if q else "")


_SUPPORTS_PROXY = "proxy" in inspect.signature(
    websockets.asyncio.client.connect.__init__).parameters


async def ws_connect(relay: Relay, token=_DEFAULT, topics: Iterable[str] = (),
                     headers: dict | None = None, *, bearer: bool = False,
                     origin: str | None = None, compression: str | None = None,
                     logger: logging.Logger | None = None, open_timeout: float = 5,
                     extra_query=(), subprotocols: list[str] | None = None, via: str = "query"):
    """Connect to relay.url. `token` defaults to one granting `*`; None sends none.
    With bearer=True (or via="header") the token goes in an `Authorization: Bearer` header, not
    the URL; with via="subprotocol" it is offered as `bearer.<token>` beside `progress-relay.v1`
    (issue 14). `subprotocols`: names to offer (after those)."""
    if token is _DEFAULT:
        token = relay.token(topics=["*"])
    hdrs = dict(headers or {})
    offered = list(subprotocols or [])
    if via == "subprotocol" and token is not None:
        offered = ["progress-relay.v1", "bearer." + token] + offered
        url = ws_url(relay, None, topics, extra_query)
    elif (bearer or via == "header") and token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
        url = ws_url(relay, None, topics, extra_query)
    else:
        url = ws_url(relay, token, topics, extra_query)
    kwargs: dict[str, Any] = dict(
        additional_headers=hdrs or None,
        compression=compression,
        max_size=2 ** 26,
        max_queue=2 ** 16,
        ping_interval=None,
        open_timeout=open_timeout,
        close_timeout=2,
    )
    if origin is not None:
        kwargs["origin"] = origin
    if offered:
        kwargs["subprotocols"] = offered
    if logger is not None:
        kwargs["logger"] = logger
    if _SUPPORTS_PROXY:
        kwargs["proxy"] = None
    ws = await _ws_connect(url, **kwargs)
    _OPEN_WS.append(ws)
    return ws


async def recv_text(ws, timeout: float = 5) -> str:
    try:
        msg = await asyncio.wait_for(ws.recv(), timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"no frame within {timeout}s")
    assert isinstance(msg, str), f"expected a text frame, got binary {msg[:100]!r}"
    return msg


async def recv_json(ws, timeout: float = 5) -> dict:
    msg = await recv_text(ws, timeout)
    try:
        v = json.loads(msg)
    except ValueError:
        raise AssertionError(f"frame is not JSON: {msg[:300]!r}")
    assert isinstance(v, dict), f"frame is not a JSON object: {msg[:300]!r}"
    return v


async def send_json(ws, obj) -> None:
    await ws.send(json.dumps(obj, separators=(",", ":")))


async def expect_nothing(ws, within: float = 0.3) -> None:
    try:
        msg = await asyncio.wait_for(ws.recv(), within)
    except asyncio.TimeoutError:
        return
    except ConnectionClosed as e:
        raise AssertionError(f"connection closed unexpectedly: {close_code_of(e)}")
    raise AssertionError(f"unexpected frame: {msg[:300]!r}")


def close_code_of(exc: ConnectionClosed) -> int | None:
    return exc.rcvd.code if exc.rcvd is not None else None


async def expect_close(ws, timeout: float = 5) -> tuple[list[dict], int | None]:
    """Read frames until the relay closes. Returns (frames before the close, close code).
    The code is None when no close frame was received (TCP closed)."""
    frames: list[dict] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"connection not closed within {timeout}s; frames: {frames}")
        try:
            msg = await asyncio.wait_for(ws.recv(), left)
        except asyncio.TimeoutError:
            raise AssertionError(f"connection not closed within {timeout}s; frames: {frames}")
        except ConnectionClosed as e:
            code = close_code_of(e)
            assert code != 1006, "the relay sent close code 1006 (reserved by RFC 6455)"
            return frames, code
        frames.append(json.loads(msg) if isinstance(msg, str) else {"<binary>": msg})


async def ping_pong(ws, timeout: float = 5) -> None:
    """The connection is alive and in order: `{"op":"ping"}` answers `pong`."""
    await send_json(ws, {"op": "ping"})
    f = await recv_json(ws, timeout)
    assert f == {"op": "pong", "type": "pong"}, f


async def subscribe(ws, topic: str, epoch: str | None = None, since: int | None = None,
                    timeout: float = 5) -> dict:
    msg: dict[str, Any] = {"op": "subscribe", "topic": topic}
    if epoch is not None:
        msg["epoch"] = epoch
    if since is not None:
        msg["since"] = since
    await send_json(ws, msg)
    f = await recv_json(ws, timeout)
    assert f.get("op") == "subscribed" and f.get("topic") == topic, f"expected subscribed: {f}"
    return f


async def recv_events(ws, n: int, timeout: float = 10) -> list[dict]:
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"got {len(out)} of {n} events in {timeout}s; last: {out[-3:]}")
        f = await recv_json(ws, left)
        assert "op" not in f, f"expected an event, got control frame {f} after {len(out)} events"
        out.append(f)
    return out


async def recv_event_texts(ws, n: int, timeout: float = 10) -> list[str]:
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"got {len(out)} of {n} events in {timeout}s")
        out.append(await recv_text(ws, left))
    return out


async def settle(relay: Relay, topic: str, seq: int, timeout: float = 5) -> dict:
    """Wait until the relay's hub shows `topic` at `seq` (ingest is asynchronous to the emitter's
    end-of-file). Returns that subscribed frame."""
    ws = await ws_connect(relay)
    try:
        deadline = time.monotonic() + timeout
        while True:
            f = await subscribe(ws, topic)
            if f.get("seq", 0) >= seq:
                return f
            if time.monotonic() > deadline:
                raise AssertionError(f"topic {topic} did not reach seq {seq}: {f}")
            await send_json(ws, {"op": "unsubscribe", "topic": topic})
            while True:   # skip anything up to the unsubscribed answer
                g = await recv_json(ws)
                if g.get("op") == "unsubscribed":
                    break
            await asyncio.sleep(0.05)
    finally:
        await ws.close()


def event_text(seq: int, original: bytes | str) -> str:
    """The frame the contract promises: `{"seq":N,` + the original bytes after `{`."""
    if isinstance(original, bytes):
        original = original.decode("utf-8")
    original = original.rstrip("\n").rstrip("\r")
    assert original.startswith("{")
    return '{"seq":%d,' % seq + original[1:]


# --------------------------------------------------------------------------------------------
# raw WebSocket client for protocol-level tests

@dataclasses.dataclass
class Frame:
    fin: bool
    rsv: int
    opcode: int
    masked: bool
    payload: bytes

    @property
    def close_code(self) -> int | None:
        if self.opcode != 0x8 or len(self.payload) < 2:
            return None
        return struct.unpack("!H", self.payload[:2])[0]

    def json(self):
        return json.loads(self.payload.decode("utf-8"))


class RawWS:
    """A blocking WebSocket client that writes frames by hand."""

    def __init__(self, relay_or_port, path: str = "/ws", *, headers: dict | None = None,
                 rcvbuf: int | None = None, timeout: float = 5.0, do_handshake: bool = True):
        port = relay_or_port.port if isinstance(relay_or_port, Relay) else int(relay_or_port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.port = port
        self.path = path
        self.buf = b""
        self.status = None
        self.headers: dict[str, str] = {}
        self.extra_headers = headers or {}
        if do_handshake:
            self.handshake()

    @classmethod
    def for_relay(cls, relay: Relay, token=_DEFAULT, topics=(), **kw) -> "RawWS":
        if token is _DEFAULT:
            token = relay.token(topics=["*"])
        url = ws_url(relay, token, topics)
        path = url[url.index("/ws"):]
        return cls(relay, path, **kw)

    def handshake(self) -> tuple[int, dict]:
        key = base64.b64encode(os.urandom(16)).decode()
        self.key = key
        lines = [
            f"GET {self.path} HTTP/1.1",
            f"Host: 127.0.0.1:{self.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ]
        lines += [f"{k}: {v}" for k, v in self.extra_headers.items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        while b"\r\n\r\n" not in self.buf:
            b = self.sock.recv(65536)
            if not b:
                raise AssertionError(f"EOF during the handshake: {self.buf!r}")
            self.buf += b
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        head_lines = head.decode("latin-1").split("\r\n")
        self.status = int(head_lines[0].split()[1])
        self.headers = {}
        for l in head_lines[1:]:
            k, _, v = l.partition(":")
            self.headers[k.strip().lower()] = v.strip()
        if self.status == 101:
            want = base64.b64encode(hashlib.sha1(
                (key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
            assert self.headers.get("sec-websocket-accept") == want, self.headers
        return self.status, self.headers

    # -- writing -------------------------------------------------------------------------------

    @staticmethod
    def build_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0,
                    mask: bool = True) -> bytes:
        b0 = (0x80 if fin else 0) | ((rsv & 0x7) << 4) | (opcode & 0xF)
        n = len(payload)
        mbit = 0x80 if mask else 0
        if n < 126:
            head = struct.pack("!BB", b0, mbit | n)
        elif n < 65536:
            head = struct.pack("!BBH", b0, mbit | 126, n)
        else:
            head = struct.pack("!BBQ", b0, mbit | 127, n)
        if mask:
            key = os.urandom(4)
            masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload)) if n < 4096 else \
                _xor_mask(payload, key)
            return head + key + masked
        return head + payload

    def send_frame(self, opcode: int, payload: bytes = b"", **kw) -> None:
        self.sock.sendall(self.build_frame(opcode, payload, **kw))

    def send_text(self, text: str | bytes, **kw) -> None:
        self.send_frame(0x1, text.encode() if isinstance(text, str) else text, **kw)

    def send_json(self, obj) -> None:
        self.send_text(json.dumps(obj, separators=(",", ":")))

    # -- reading -------------------------------------------------------------------------------

    def _fill(self, n: int, deadline: float) -> bool:
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout()
            self.sock.settimeout(left)
            b = self.sock.recv(max(65536, n - len(self.buf)))
            if not b:
                return False
            self.buf += b
        return True

    def recv_frame(self, timeout: float = 5.0) -> Frame | None:
        """Next frame, or None at EOF. Raises socket.timeout, or ConnectionResetError."""
        deadline = time.monotonic() + timeout
        if not self._fill(2, deadline):
            return None
        b0, b1 = self.buf[0], self.buf[1]
        n = b1 & 0x7F
        hl = 2
        if n == 126:
            if not self._fill(4, deadline):
                return None
            n = struct.unpack("!H", self.buf[2:4])[0]
            hl = 4
        elif n == 127:
            if not self._fill(10, deadline):
                return None
            n = struct.unpack("!Q", self.buf[2:10])[0]
            hl = 10
        masked = bool(b1 & 0x80)
        if masked:
            hl += 4
        if not self._fill(hl + n, deadline):
            return None
        payload = self.buf[hl:hl + n]
        if masked:
            payload = _xor_mask(payload, self.buf[hl - 4:hl])
        self.buf = self.buf[hl + n:]
        return Frame(bool(b0 & 0x80), (b0 >> 4) & 7, b0 & 0xF, masked, payload)

    def recv_data(self, timeout: float = 5.0, answer_pings: bool = True) -> Frame:
        """Next data frame (answers pings on the way); fails on close or EOF."""
        deadline = time.monotonic() + timeout
        while True:
            f = self.recv_frame(max(0.01, deadline - time.monotonic()))
            assert f is not None, "EOF while waiting for a data frame"
            assert not f.masked, "the relay sent a masked frame"
            if f.opcode == 0x9:
                if answer_pings:
                    self.send_frame(0xA, f.payload)
                continue
            if f.opcode == 0xA:
                continue
            assert f.opcode != 0x8, f"closed with {f.close_code} while waiting for data"
            return f

    def recv_json(self, timeout: float = 5.0):
        f = self.recv_data(timeout)
        assert f.opcode == 0x1, f"expected a text frame, got opcode {f.opcode}"
        return f.json()

    def read_until_close(self, timeout: float = 5.0, answer_pings: bool = False):
        """Read until a close frame or EOF/reset. Returns (data frames, close code or None, how)
        where how is "close", "eof" or "reset". Asserts the relay never sends 1006."""
        frames = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"not closed within {timeout}s; {len(frames)} data frames read")
            try:
                f = self.recv_frame(left)
            except socket.timeout:
                raise AssertionError(
                    f"not closed within {timeout}s; {len(frames)} data frames read")
            except (ConnectionResetError, BrokenPipeError):
                return frames, None, "reset"
            if f is None:
                return frames, None, "eof"
            assert not f.masked, "the relay sent a masked frame (RFC 6455 5.1)"
            if f.opcode == 0x8:
                code = f.close_code
                assert code != 1006, "the relay sent close code 1006 (reserved by RFC 6455)"
                return frames, code, "close"
            if f.opcode == 0x9:
                if answer_pings:
                    try:
                        self.send_frame(0xA, f.payload)
                    except OSError:
                        pass
                continue
            if f.opcode == 0xA:
                continue
            frames.append(f)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def _xor_mask(data: bytes, key: bytes) -> bytes:
    n = len(data)
    if n == 0:
        return b""
    k = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(k, "big")).to_bytes(n, "big")


# --------------------------------------------------------------------------------------------
# the command line

def run_cli(args: list[str], *, env: dict | None = None, input: bytes | str | None = None,
            timeout: float = 15, cwd: str | None = None,
            as_root: bool = False) -> subprocess.CompletedProcess:
    """`progress-relay ARGS`, unprivileged as the relay is (see unprivileged_prefix): files it
    reads must be the relay user's (write_secret, give_to_relay_user). as_root=True keeps the
    test's user; a test that needs it says why."""
    e = {k: v for k, v in os.environ.items()
         if not (k.startswith("PROGRESS_RELAY_") and k != "PROGRESS_RELAY_BIN")}
    e.update(env or {})
    if isinstance(input, str):
        input = input.encode()
    try:
        command = [*([] if as_root else unprivileged_prefix()), require_bin(), *args]
        return _retry_busy(lambda: subprocess.run(
            command, env=e, input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True, timeout=timeout, cwd=cwd))
    except subprocess.TimeoutExpired as ex:
        raise AssertionError(f"`progress-relay {' '.join(args)}` did not exit within {timeout}s; "
                             f"stdout={ex.stdout!r} stderr={ex.stderr!r}")


def stats_number(stats: dict, *names: str) -> int | float | None:
    """Find a count in /stats by key name, at the top level or one level down
    (e.g. {"topics": 3} or {"hub": {"topics": 3}}). The contract names no keys."""
    for name in names:
        if name in stats and isinstance(stats[name], (int, float)):
            return stats[name]
    for v in stats.values():
        if isinstance(v, dict):
            for name in names:
                if name in v and isinstance(v[name], (int, float)):
                    return v[name]
    return None


def topic_count(relay: Relay) -> int:
    s = relay.stats()
    n = stats_number(s, "topics", "topic_count", "topicCount", "topics_count")
    assert n is not None, f"/stats has no topic count (looked for key 'topics'): {s}"
    return n


# --------------------------------------------------------------------------------------------
# public-key tokens (RS256, ES256, EdDSA) through the openssl command

def have_openssl() -> bool:
    return shutil.which("openssl") is not None


def openssl_keypair(kind: str, directory: Path) -> tuple[Path, Path]:
    """kind: "rsa", "ec" (P-256) or "ed25519". Returns (private PEM, public PEM)."""
    priv = Path(directory) / f"{kind}-{secrets.token_hex(4)}.key"
    pub = priv.with_suffix(".pub.pem")
    gen = {
        "rsa": ["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        "ec": ["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
        "ed25519": ["openssl", "genpkey", "-algorithm", "ED25519"],
    }[kind]
    subprocess.run(gen + ["-out", str(priv)], check=True, capture_output=True)
    subprocess.run(["openssl", "pkey", "-in", str(priv), "-pubout", "-out", str(pub)],
                   check=True, capture_output=True)
    return priv, pub


def _der_ecdsa_to_raw(der: bytes, size: int = 32) -> bytes:
    # SEQUENCE { INTEGER r, INTEGER s }
    assert der[0] == 0x30
    i = 2 if der[1] < 0x80 else 2 + (der[1] & 0x7F)
    out = b""
    for _ in range(2):
        assert der[i] == 0x02
        n = der[i + 1]
        v = der[i + 2:i + 2 + n].lstrip(b"\x00")
        out += v.rjust(size, b"\x00")
        i += 2 + n
    return out


def sign_jwt_openssl(claims: dict, alg: str, private_key: Path, *, header_alg: str | None = None
                     ) -> str:
    """A JWT signed with `alg` (RS256, ES256 or EdDSA) by openssl; `header_alg` may differ."""
    hdr = {"alg": header_alg or alg, "typ": "JWT"}
    signing_input = (b64url(json.dumps(hdr, separators=(",", ":")).encode()) + "."
                     + b64url(json.dumps(claims, separators=(",", ":")).encode())).encode()
    with tempfile.NamedTemporaryFile() as f:
        f.write(signing_input)
        f.flush()
        if alg == "EdDSA":
            cmd = ["openssl", "pkeyutl", "-sign", "-rawin", "-inkey", str(private_key),
                   "-in", f.name]
        else:
            cmd = ["openssl", "dgst", "-sha256", "-sign", str(private_key), f.name]
        sig = subprocess.run(cmd, check=True, capture_output=True).stdout
    if alg == "ES256":
        sig = _der_ecdsa_to_raw(sig)
    return signing_input.decode() + "." + b64url(sig)
