"""A redis-server of its own for the cluster-mode tests (issue 13), and a tiny RESP client.

`RedisServer` starts `/usr/bin/redis-server` (or $PROGRESS_RELAY_REDIS_SERVER) in the foreground,
in a fresh short temporary directory, listening on a Unix socket there (`unix=True`, the default)
or on TCP 127.0.0.1:<free port> (`tcp=True`), with persistence off (`--save "" --appendonly no`)
unless a test's options say otherwise. The relays of a test run as the unprivileged relay user
(relaylib.RELAY_UID when the tests run as root): the directory is given to that user
(relaylib.give_to_relay_user), so it can reach the socket, which is mode 0777
(`--unixsocketperm 777`). Redis itself runs as the test's user: it is the test's instrument, and
root can write into the relay user's directory.

The server can be stopped (`SHUTDOWN NOSAVE`/`SAVE`, or SIGKILL), started again on the same socket
and directory (so that it loads the directory's RDB or AOF when there is one), paused and resumed
(SIGSTOP/SIGCONT). `cli(*args)` sends one command over a fresh connection and returns the decoded
reply; `pipeline([...])` sends many on one. Every server a test starts is stopped and its
directory removed at teardown (`cleanup`), whatever state it is in.

Standard library only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable

from relaylib import free_port, give_to_relay_user, short_tmpdir

REDIS_SERVER = os.environ.get("PROGRESS_RELAY_REDIS_SERVER") or shutil.which("redis-server") \
    or "/usr/bin/redis-server"

_STARTED: list["RedisServer"] = []   # servers started during the current test (failure reports)


def have_redis() -> bool:
    return os.path.isfile(REDIS_SERVER) and os.access(REDIS_SERVER, os.X_OK)


# --------------------------------------------------------------------------------------------
# RESP2 client

class RespError(Exception):
    """An error reply (`-ERR ...`)."""


def encode_command(args: Iterable[Any]) -> bytes:
    parts = []
    n = 0
    for a in args:
        if isinstance(a, bytes):
            b = a
        elif isinstance(a, str):
            b = a.encode()
        else:
            b = str(a).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
        n += 1
    return b"*%d\r\n" % n + b"".join(parts)


class RespConnection:
    """One blocking connection. Replies: bytes (bulk/simple strings), int, list, None, or a
    RespError instance (raised by `call`, returned in place by `pipeline`)."""

    def __init__(self, address: str | tuple[str, int], timeout: float = 5.0,
                 password: str | None = None):
        if isinstance(address, tuple):
            self.sock = socket.create_connection(address, timeout=timeout)
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(address)
        self.f = self.sock.makefile("rb")
        if password is not None:
            self.call("AUTH", password)

    def close(self):
        with contextlib.suppress(OSError):
            self.f.close()
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _read(self):
        line = self.f.readline()
        if not line:
            raise ConnectionError("redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest
        if kind == b"-":
            return RespError(rest.decode("utf-8", "replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.f.read(n + 2)
            if len(data) != n + 2:
                raise ConnectionError("redis closed the connection mid-reply")
            return data[:-2]
        if kind == b"*":
            n = int(rest)
            if n < 0:
                return None
            return [self._read() for _ in range(n)]
        raise ConnectionError(f"bad RESP reply line {line!r}")

    def call(self, *args):
        self.sock.sendall(encode_command(args))
        r = self._read()
        if isinstance(r, RespError):
            raise r
        return r

    def send_only(self, *args):
        self.sock.sendall(encode_command(args))

    def pipeline(self, commands: Iterable[Iterable[Any]], chunk: int = 1000) -> list:
        out = []
        batch: list[bytes] = []

        def flush():
            if batch:
                self.sock.sendall(b"".join(batch))
                out.extend(self._read() for _ in range(len(batch)))
                batch.clear()

        for c in commands:
            batch.append(encode_command(c))
            if len(batch) >= chunk:
                flush()
        flush()
        return out


def text(v) -> Any:
    """A reply with bytes decoded (recursively)."""
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, list):
        return [text(x) for x in v]
    return v


# --------------------------------------------------------------------------------------------
# the server

class RedisServer:
    """One redis-server process in its own temporary directory.

    options: extra command-line options, e.g. ("--client-output-buffer-limit", "pubsub 64kb 32kb 1")
    or ("--appendonly", "yes", "--appendfsync", "always"); they come after the defaults and
    override them. tcp=True: listen on 127.0.0.1:<free port> instead of a Unix socket.
    password: `--requirepass` (the client here then authenticates)."""

    def __init__(self, options: Iterable[str] = (), *, tcp: bool = False,
                 password: str | None = None, name: str = "redis"):
        if not have_redis():
            raise RuntimeError(f"redis-server not found at {REDIS_SERVER}")
        self.name = name
        self.tcp = tcp
        self.password = password
        self.options = list(options)
        self.dir = short_tmpdir("rd-")
        # The relay's user must reach the socket in here (see the module docstring).
        give_to_relay_user(self.dir)
        self.socket_path = str(self.dir / "redis.sock")
        self.port = free_port() if tcp else 0
        self.log_path = self.dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        _STARTED.append(self)

    # -- addresses -----------------------------------------------------------------------------

    @property
    def address(self) -> str | tuple[str, int]:
        return ("127.0.0.1", self.port) if self.tcp else self.socket_path

    def url(self, db: int | None = None, user: str | None = None,
            password: str | None = None) -> str:
        """The relay's --redis value for this server."""
        if not self.tcp:
            return f"unix://{self.socket_path}"
        cred = ""
        if password is not None:
            cred = f"{user or ''}:{password}@"
        return f"redis://{cred}127.0.0.1:{self.port}" + (f"/{db}" if db is not None else "")

    # -- process control -----------------------------------------------------------------------

    @property
    def args(self) -> list[str]:
        a = [REDIS_SERVER,
             "--port", str(self.port),
             "--save", "", "--appendonly", "no", "--daemonize", "no",
             "--dir", str(self.dir), "--logfile", "",
             "--databases", "16"]
        if self.tcp:
            a += ["--bind", "127.0.0.1"]
        else:
            a += ["--unixsocket", self.socket_path, "--unixsocketperm", "777"]
        if self.password is not None:
            a += ["--requirepass", self.password]
        return a + self.options

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 10.0) -> "RedisServer":
        assert not self.running, "redis-server is already running"
        self.starts += 1
        with open(self.log_path, "ab") as f:
            f.write(f"===== start #{self.starts}: {' '.join(map(repr, self.args))}\n".encode())
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, cwd=self.dir)
        finally:
            log.close()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise AssertionError(f"redis-server exited with {rc} at start\n{self.log_tail()}")
            try:
                r = self.cli("PING", timeout=1)
                if r == b"PONG":
                    # loading an RDB/AOF answers -LOADING; PING is answered only after it
                    return
            except (OSError, ConnectionError, RespError) as e:
                last = e
            if time.monotonic() > deadline:
                raise AssertionError(f"redis-server not ready after {timeout}s ({last!r})\n"
                                     f"{self.log_tail()}")
            time.sleep(0.02)

    def stop(self, nosave: bool = True, timeout: float = 10.0) -> int:
        """SHUTDOWN NOSAVE (or SAVE), then wait for the exit; SIGKILL after `timeout` s."""
        if not self.running:
            return self.proc.returncode if self.proc else 0
        self.cont()
        try:
            with self.connect(timeout=2) as c:
                c.send_only("SHUTDOWN", "NOSAVE" if nosave else "SAVE")
                with contextlib.suppress(OSError, ConnectionError):
                    c._read()
        except (OSError, ConnectionError):
            pass
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return self.kill()

    def kill(self) -> int:
        """SIGKILL: no save, no goodbye (the socket file stays behind)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(10)

    def restart(self, nosave: bool = True, timeout: float = 10.0) -> "RedisServer":
        """Stop (if running) and start again with the same arguments, socket and directory."""
        if self.running:
            self.stop(nosave=nosave)
        return self.start(timeout)

    def pause(self) -> None:
        """SIGSTOP: the process keeps its connections and answers nothing."""
        self.proc.send_signal(signal.SIGSTOP)

    def cont(self) -> None:
        if self.running:
            self.proc.send_signal(signal.SIGCONT)

    @contextlib.contextmanager
    def paused(self):
        self.pause()
        try:
            yield self
        finally:
            self.cont()

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_text(self) -> str:
        try:
            return self.log_path.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, max_chars: int = 8000) -> str:
        t = self.log_text()
        if len(t) > max_chars:
            t = "...\n" + t[-max_chars:]
        return f"----- {self.name} log ({self.log_path}) -----\n{t}"

    # -- commands ------------------------------------------------------------------------------

    def connect(self, timeout: float = 5.0) -> RespConnection:
        return RespConnection(self.address, timeout=timeout, password=self.password)

    def cli(self, *args, timeout: float = 5.0):
        """One command on a fresh connection (so that CLIENT KILL of a test never hits it)."""
        with self.connect(timeout) as c:
            return c.call(*args)

    def pipeline(self, commands: Iterable[Iterable[Any]], timeout: float = 30.0) -> list:
        with self.connect(timeout) as c:
            return c.pipeline(commands)

    def info(self, section: str | None = None) -> dict[str, str]:
        raw = self.cli("INFO", *([section] if section else []))
        out = {}
        for line in raw.decode().splitlines():
            if line and not line.startswith("#") and ":" in line:
                k, _, v = line.partition(":")
                out[k] = v
        return out

    @property
    def used_memory(self) -> int:
        return int(self.info("memory")["used_memory"])

    @property
    def run_id(self) -> str:
        return self.info("server")["run_id"]

    def scan(self, match: str, count: int = 1000) -> list[str]:
        keys: list[str] = []
        cursor = b"0"
        while True:
            cursor, batch = self.cli("SCAN", cursor, "MATCH", match, "COUNT", count)
            keys += [k.decode() for k in batch]
            if cursor == b"0":
                return keys

    def clients(self, kind: str | None = None) -> list[dict[str, str]]:
        """CLIENT LIST [TYPE kind], parsed; without the connection that asks."""
        raw = self.cli("CLIENT", "LIST", *(["TYPE", kind] if kind else [])).decode()
        out = []
        for line in raw.splitlines():
            d = dict(f.split("=", 1) for f in line.split() if "=" in f)
            if d.get("cmd") != "client|list":
                out.append(d)
        return out
