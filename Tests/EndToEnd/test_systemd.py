"""Contract section 3, "Socket activation": sockets passed the systemd way (LISTEN_FDS,
LISTEN_PID, LISTEN_FDNAMES) and sd_notify messages (NOTIFY_SOCKET). systemd itself is not needed:
a small Python wrapper puts the sockets at fd 3 and 4, sets LISTEN_PID to its own pid and execs
the relay, as systemd does."""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import socket
import sys
import threading
import time

from relaylib import (
    async_test, event_text, give_to_relay_user, recv_event_texts, recv_events, recv_json,
    subscribe, ws_connect,
)

WRAPPER = r"""
import os, sys
n = int(os.environ.get("E2E_FD_COUNT", "0"))
src = [int(x) for x in os.environ.get("E2E_FDS", "").split(",") if x]
for i, fd in enumerate(src):
    os.dup2(fd, 3 + i, inheritable=True)
for fd in src:
    if fd >= 3 + n:
        os.close(fd)
if n:
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.environ["LISTEN_FDS"] = str(n)
if "WATCHDOG_USEC" in os.environ:
    os.environ["WATCHDOG_PID"] = str(os.getpid())
for k in ("E2E_FD_COUNT", "E2E_FDS"):
    os.environ.pop(k, None)
os.execv(sys.argv[1], sys.argv[1:])
"""


class Activation:
    """Listening sockets held by the test (as systemd holds them) across relay restarts."""

    def __init__(self, relay, unix=True, tcp=True):
        self.unix = self.tcp = None
        fds = []
        if unix:
            self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.unix.bind(relay.socket_path)
            self.unix.listen(128)
            fds.append(self.unix)
        if tcp:
            self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.tcp.bind(("127.0.0.1", 0))
            self.tcp.listen(128)
            relay.port = self.tcp.getsockname()[1]
            fds.append(self.tcp)
        # high numbers, so that moving them to 3, 4 never overwrites one another
        self.high = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD, 60 + i) for i, s in enumerate(fds)]
        for fd in self.high:
            os.set_inheritable(fd, True)
        relay.launch_prefix = [sys.executable, "-c", WRAPPER]
        relay.popen_kwargs = {"pass_fds": tuple(self.high)}
        relay.env["E2E_FD_COUNT"] = str(len(fds))
        relay.env["E2E_FDS"] = ",".join(map(str, self.high))
        relay.env["LISTEN_FDNAMES"] = ":".join(["whatever", "names"][:len(fds)])

    def close(self):
        for fd in self.high:
            os.close(fd)
        for s in (self.unix, self.tcp):
            if s:
                s.close()


def activated_relay(relay_factory, unix=True, tcp=True, extra=()):
    r = relay_factory(flags=False, start=False)
    flag_sock = str(r.dir / "flag.sock")
    flag_port = r.port
    act = Activation(r, unix=unix, tcp=tcp)
    r.extra_args = [
        "--socket", flag_sock if unix else r.socket_path,
        "--listen", f"127.0.0.1:{flag_port}",
        "--jwt-secret-file", r.secret_file, "--log-level", "debug", *extra,
    ]
    if not tcp:
        r.port = flag_port
    r.flag_sock = flag_sock
    r.flag_port = flag_port
    return r, act


@async_test
async def test_adopts_both_passed_sockets(relay_factory):
    r, act = activated_relay(relay_factory)
    try:
        r.start(timeout=8)   # /healthz on the passed TCP socket
        assert not os.path.exists(r.flag_sock), "--socket was not ignored"
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", r.flag_port)) != 0, "--listen was not ignored"
        ws = await ws_connect(r, topics=["sa"])
        await recv_json(ws)
        assert await r.aemit([b'{"topic":"sa","n":1}']) == []
        assert await recv_events(ws, 1) == [{"seq": 1, "topic": "sa", "n": 1}]
    finally:
        r.stop()
        act.close()


@async_test
async def test_listener_not_passed_is_bound_from_its_flag(relay_factory):
    r, act = activated_relay(relay_factory, unix=True, tcp=False)
    try:
        r.start(timeout=8)   # /healthz on the --listen port, ingest on the passed Unix socket
        assert not os.path.exists(r.flag_sock)
        ws = await ws_connect(r, topics=["sb"])
        await recv_json(ws)
        assert await r.aemit([b'{"topic":"sb"}']) == []
        assert await recv_events(ws, 1) == [{"seq": 1, "topic": "sb"}]
    finally:
        r.stop()
        act.close()


@async_test(timeout=60)
async def test_no_line_lost_across_a_restart_with_socket_activation(relay_factory):
    r, act = activated_relay(relay_factory)
    r.extra_args += ["--state-file", str(r.dir / "state.json")]
    try:
        r.start(timeout=8)
        ws = await ws_connect(r, topics=["zr"])
        s0 = await recv_json(ws)
        first = [b'{"topic":"zr","i":%d}' % i for i in range(1, 4)]
        assert await r.aemit(first) == []
        await recv_events(ws, 3)
        assert r.stop() == 0
        assert os.path.exists(r.socket_path), "the relay removed the socket systemd passed it"

        # the relay is down: the kernel still accepts on the held listening socket
        later = [b'{"topic":"zr","i":%d}' % i for i in range(4, 9)]
        answers: list = []

        def emit_while_down():
            answers.extend(r.emit_lines(later, timeout=20))

        t = threading.Thread(target=emit_while_down)
        t.start()
        await asyncio.sleep(0.3)
        r.start()
        await asyncio.to_thread(t.join, 20)
        assert answers == []

        ws = await ws_connect(r)
        deadline = time.monotonic() + 5
        while True:
            f = await subscribe(ws, "zr", epoch=s0["epoch"], since=3)
            if f["seq"] >= 8 or time.monotonic() > deadline:
                break
            await ws.send('{"op":"unsubscribe","topic":"zr"}')
            while (await recv_json(ws)).get("op") != "unsubscribed":
                pass
            await asyncio.sleep(0.05)
        assert (f["epoch"], f["seq"], f["recovered"]) == (s0["epoch"], 8, True), f
        assert await recv_event_texts(ws, 5) == [event_text(i, l) for i, l in
                                                 enumerate(later, start=4)]
    finally:
        r.stop()
        act.close()


class Notify:
    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        give_to_relay_user(path)   # the relay (its own user) must be able to send to it
        self.sock.settimeout(0.1)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            self.messages.append(data.decode("utf-8", "replace"))

    def seen(self, key: str) -> bool:
        return any(key in m.split("\n") for m in self.messages)

    def seen_prefix(self, prefix: str) -> bool:
        return any(l.startswith(prefix) for m in self.messages for l in m.split("\n"))

    def wait(self, key: str, timeout: float = 5) -> None:
        deadline = time.monotonic() + timeout
        while not self.seen(key):
            assert time.monotonic() < deadline, f"no {key} within {timeout}s: {self.messages}"
            time.sleep(0.02)

    def close(self):
        self._stop.set()
        self._t.join(2)
        self.sock.close()


def test_sd_notify_ready_watchdog_status_stopping(relay_factory):
    r = relay_factory(start=False)
    n = Notify(str(r.dir / "notify.sock"))
    try:
        r.env["NOTIFY_SOCKET"] = str(r.dir / "notify.sock")
        r.env["WATCHDOG_USEC"] = "1000000"
        r.launch_prefix = [sys.executable, "-c", WRAPPER]   # sets WATCHDOG_PID to the relay's
        r.start()
        n.wait("READY=1")
        assert not n.seen("STOPPING=1")
        n.wait("WATCHDOG=1", timeout=3)
        assert n.seen_prefix("STATUS="), n.messages
        assert r.stop(signal.SIGTERM) == 0
        n.wait("STOPPING=1", timeout=2)
        ready_at = next(i for i, m in enumerate(n.messages) if "READY=1" in m.split("\n"))
        stop_at = next(i for i, m in enumerate(n.messages) if "STOPPING=1" in m.split("\n"))
        assert ready_at < stop_at
    finally:
        n.close()


def test_without_notify_socket_nothing_breaks(relay):
    # the ordinary fixture runs without NOTIFY_SOCKET; it must serve as usual
    status, body = relay.http("/healthz")
    assert (status, body.strip()) == (200, "ok")


def test_listen_fds_for_another_pid_are_ignored(relay_factory):
    """LISTEN_PID names another process: the fds are not ours; bind from the flags."""
    r = relay_factory(start=False)
    r.env["LISTEN_FDS"] = "2"
    r.env["LISTEN_PID"] = "1"   # not the relay
    r.start()
    status, _ = r.http("/healthz")
    assert status == 200
    assert os.path.exists(r.socket_path)
