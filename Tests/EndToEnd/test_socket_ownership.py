"""Other users' sockets and files (issue 12, section 3): a socket the relay cannot probe is left
alone, shutdown removes only the socket file the relay bound, and `serve --dev` keeps its secret
and socket in paths of its own user and survives a standard output it cannot write."""

from __future__ import annotations

import asyncio
import http.client
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
import types
from pathlib import Path

import pytest

from relaylib import (
    RELAY_UID, _read_to_eof, _retry_busy, _unused_id, async_test, drops_privileges, free_port,
    give_to_relay_user, recv_events, require_bin, run_cli, short_tmpdir, subscribe,
    unprivileged_prefix, verify_hs, wait_until, ws_connect,
)

JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


def error_lines(stderr: bytes) -> list[str]:
    return [l for l in stderr.decode("utf-8", "replace").splitlines()
            if l.startswith("progress-relay:")]


def listening_unix_socket(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen()
    return s


def assert_still_serves(listener: socket.socket, path: str) -> None:
    """A client can still connect to `path` and reach `listener`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(5)
        c.connect(path)
        listener.settimeout(5)
        conn, _ = listener.accept()
        with conn:
            c.sendall(b"x")
            assert conn.recv(1) == b"x"


# ---------------------------------------------------------------------------------------------
# --socket: another user's socket, and the file at shutdown

def test_socket_of_another_user_is_not_replaced(relay_factory):
    if not drops_privileges():
        pytest.skip("needs a socket of another user: run the tests as root")
    relay = relay_factory(start=False)
    # root's live socket, mode 0600, in a directory the relay's user owns (and could unlink in)
    holder = listening_unix_socket(relay.socket_path)
    try:
        os.chmod(relay.socket_path, 0o600)
        inode = os.stat(relay.socket_path).st_ino
        cp = relay.run_to_exit(timeout=8)
        assert cp.returncode == 2, (cp.returncode, cp.stderr)
        assert error_lines(cp.stderr) == [
            f"progress-relay: --socket {relay.socket_path}: in use by someone else or not reachable "
            "(Permission denied); refusing to replace it"], cp.stderr
        assert os.stat(relay.socket_path).st_ino == inode, "the other user's socket file was replaced"
        assert_still_serves(holder, relay.socket_path)
    finally:
        holder.close()


def test_shutdown_leaves_a_socket_file_that_replaced_its_own(relay):
    path = relay.socket_path
    os.rename(path, path + ".moved")       # the relay's own file, moved away
    other = listening_unix_socket(path)    # and another socket in its place
    try:
        inode = os.stat(path).st_ino
        assert relay.stop() == 0
        assert os.path.exists(path), "the relay removed a socket file it did not bind"
        assert os.stat(path).st_ino == inode
        assert_still_serves(other, path)
    finally:
        other.close()


# ---------------------------------------------------------------------------------------------
# serve --dev: per-user files

def relay_uid() -> int:
    """The uid the relay runs as."""
    return RELAY_UID if drops_privileges() else os.getuid()


@pytest.fixture
def base():
    d = short_tmpdir("prdev-")
    give_to_relay_user(d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


class DevRelay:
    """`progress-relay serve --dev --listen 127.0.0.1:PORT` as the relay's user, with TMPDIR and
    XDG_RUNTIME_DIR (unset when None) as given."""

    def __init__(self, base: Path, *, tmpdir: Path, xdg: Path | None = None, extra=(),
                 stdout=subprocess.PIPE):
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROGRESS_RELAY_")}
        env.pop("XDG_RUNTIME_DIR", None)
        env["TMPDIR"] = str(tmpdir)
        if xdg is not None:
            env["XDG_RUNTIME_DIR"] = str(xdg)
        self.stderr_path = base / "dev-stderr.log"
        command = [*unprivileged_prefix(), require_bin(), "serve", "--dev",
                   "--listen", f"127.0.0.1:{self.port}", *extra]
        with open(self.stderr_path, "wb") as err:
            self.proc = _retry_busy(lambda: subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=stdout, stderr=err, env=env, cwd=base))
        self.out: list[bytes] = []
        if stdout is subprocess.PIPE:
            threading.Thread(target=self._read, daemon=True).start()
        self.target = types.SimpleNamespace(url=f"ws://127.0.0.1:{self.port}/ws", port=self.port)

    def _read(self):
        for chunk in iter(lambda: self.proc.stdout.read1(65536), b""):
            self.out.append(chunk)

    def stdout(self) -> str:
        return b"".join(self.out).decode("utf-8", "replace")

    def stderr(self) -> str:
        return self.stderr_path.read_bytes().decode("utf-8", "replace")

    def banner(self, timeout: float = 15) -> str:
        """The whole banner (up to the line after "Mint another token:")."""
        def done():
            if self.proc.poll() is not None:
                raise AssertionError(f"serve --dev exited with status {self.proc.returncode}\n"
                                     f"stdout: {self.stdout()}\nstderr: {self.stderr()}")
            return re.search(r"Mint another token:\n[^\n]*\n", self.stdout())
        try:
            wait_until(done, timeout, what="the --dev banner")
        except AssertionError as e:
            raise AssertionError(f"{e}\nstdout: {self.stdout()}\nstderr: {self.stderr()}")
        return self.stdout()

    def healthz(self) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", "/healthz")
            return conn.getresponse().status
        finally:
            conn.close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout:
            self.proc.stdout.close()
        return self.proc.returncode


def banner_secret(banner: str) -> str:
    m = re.search(r"secret:\s+(\S+)", banner)
    assert m, banner
    return m.group(1)


def emit_one(socket_path: Path, line: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(socket_path))
        s.sendall(line + b"\n")
        s.shutdown(socket.SHUT_WR)
        return _read_to_eof(s, 5, "the relay did not close the ingest connection")


XDG = ["unset", "own-directory", "missing-directory"]


@pytest.mark.parametrize("xdg", XDG)
@async_test(timeout=60)
async def test_dev_secret_and_socket_are_the_users_own(base, xdg):
    uid = relay_uid()
    tmpdir = base / "tmp"
    tmpdir.mkdir()
    give_to_relay_user(tmpdir)
    xdg_dir = None
    if xdg == "own-directory":
        xdg_dir = base / "xdg"
        xdg_dir.mkdir(mode=0o700)
        give_to_relay_user(xdg_dir)
        secret_path = xdg_dir / "progress-relay-dev-secret"
        socket_path = xdg_dir / "progress-relay.sock"
    else:
        if xdg == "missing-directory":
            xdg_dir = base / "no-such-directory"
        secret_path = tmpdir / f"progress-relay-dev-secret-{uid}"
        socket_path = tmpdir / f"progress-relay-{uid}.sock"

    dev = DevRelay(base, tmpdir=tmpdir, xdg=xdg_dir)
    try:
        banner = await asyncio.to_thread(dev.banner)
        secret = banner_secret(banner)
        assert f"(also in {secret_path})" in banner, banner
        st = os.lstat(secret_path)
        assert stat.S_ISREG(st.st_mode), "the secret is not a regular file"
        assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
        assert st.st_uid == uid
        assert secret_path.read_bytes().rstrip(b"\n") == secret.encode()

        # the socket is the user's own too, and the banner names it
        assert stat.S_ISSOCK(os.lstat(socket_path).st_mode), f"no socket at {socket_path}"
        assert f"--socket {socket_path} " in banner, banner

        # the banner's token command works: its token is signed with the printed secret
        mint = [l.strip() for l in banner.splitlines() if l.strip().startswith("progress-relay token")]
        assert len(mint) == 1, banner
        words = shlex.split(mint[0])
        assert words[:4] == ["progress-relay", "token", "--jwt-secret-file", str(secret_path)], words
        cp = await asyncio.to_thread(run_cli, words[1:])
        assert cp.returncode == 0, cp.stderr
        token = cp.stdout.decode().strip()
        assert verify_hs(token, secret)
        ws = await ws_connect(dev.target, token=token)
        await subscribe(ws, "task:1")
        assert await asyncio.to_thread(emit_one, socket_path, b'{"topic":"task:1","n":1}') == b""
        assert await recv_events(ws, 1) == [{"seq": 1, "topic": "task:1", "n": 1}]
        await ws.close()
    finally:
        rc = dev.stop()
    assert rc == 0, dev.stderr()
    assert not socket_path.exists(), "the socket file is left after SIGTERM"


@pytest.mark.parametrize("kind", ["another-users-file", "symlink"])
@async_test(timeout=60)
async def test_dev_does_not_write_a_secret_path_it_does_not_own(base, kind):
    uid = relay_uid()
    tmpdir = base / "tmp"   # like /tmp: everyone's, sticky (root's, when the tests run as root)
    tmpdir.mkdir()
    tmpdir.chmod(0o1777)
    path = tmpdir / f"progress-relay-dev-secret-{uid}"
    target = base / "target"
    if kind == "another-users-file":
        if not drops_privileges():
            pytest.skip("needs a file of another user: run the tests as root")
        path.write_bytes(b"someone else's secret\n")
        other = _unused_id(RELAY_UID + 1)
        os.chown(path, other, other)
        path.chmod(0o644)
    else:
        os.symlink(target, path)      # the user's own link, to a file that does not exist
        give_to_relay_user(path)
    before = os.lstat(path)

    dev = DevRelay(base, tmpdir=tmpdir)
    try:
        banner = await asyncio.to_thread(dev.banner)
        assert "the secret could not be written" in banner, banner
        assert f"--jwt-secret-file {path}" not in banner, \
            "the banner offers a token command with a secret file it did not write"
        await asyncio.to_thread(wait_until, lambda: "--dev: could not write the secret"
                                in dev.stderr(), 5, what="the message on standard error")
        # the relay serves anyway, with the printed token
        assert dev.healthz() == 200
        token = JWT_RE.search(banner).group(0)
        assert verify_hs(token, banner_secret(banner))
        ws = await ws_connect(dev.target, token=token)
        await subscribe(ws, "demo")
        await ws.close()
        after = os.lstat(path)
        assert (after.st_ino, after.st_uid, after.st_mode, after.st_size) == \
            (before.st_ino, before.st_uid, before.st_mode, before.st_size)
        if kind == "another-users-file":
            assert path.read_bytes() == b"someone else's secret\n"
        else:
            assert not os.path.lexists(target), "the secret was written through the symlink"
    finally:
        rc = dev.stop()
    assert rc == 0, dev.stderr()


# ---------------------------------------------------------------------------------------------
# serve --dev: a standard output that cannot be written

@pytest.mark.parametrize("out", ["closed-pipe", "dev-full"])
def test_dev_keeps_serving_when_the_banner_cannot_be_printed(base, out):
    tmpdir = base / "tmp"
    tmpdir.mkdir()
    give_to_relay_user(tmpdir)
    socket_path = base / "p.sock"
    if out == "closed-pipe":   # `serve --dev | true`: the reader is gone
        r, fd = os.pipe()
        os.close(r)
    else:                      # `serve --dev >/dev/full`
        fd = os.open("/dev/full", os.O_WRONLY)
    try:
        dev = DevRelay(base, tmpdir=tmpdir, extra=["--socket", str(socket_path)], stdout=fd)
    finally:
        os.close(fd)
    try:
        wait_until(lambda: "could not print the --dev banner" in dev.stderr()
                   or dev.proc.poll() is not None, 15, what="the banner's failure")
        assert dev.proc.poll() is None, \
            f"serve --dev died (status {dev.proc.returncode}) printing its banner\n{dev.stderr()}"
        time.sleep(0.2)
        assert dev.healthz() == 200
        assert dev.proc.poll() is None
        assert stat.S_ISSOCK(os.lstat(socket_path).st_mode)
    finally:
        rc = dev.stop()
    assert rc == 0, dev.stderr()
    assert not socket_path.exists(), "the socket file is left"
