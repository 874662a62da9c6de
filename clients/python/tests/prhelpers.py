"""Test helpers for the Python and shell clients: a real `progress-relay serve` process, and a
WebSocket subscriber (the `websockets` package) that runs in its own thread, collects the events
of its topics, resumes after the relay restarts, and can replay a topic from its first event.

The relay binary is $PROGRESS_RELAY_BIN, else the repository's .build/debug/progress-relay.
"""

from __future__ import annotations

import asyncio
import collections
import http.client
import inspect
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import websockets
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

import progress_relay

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent.parent


def relay_bin() -> str:
    path = os.environ.get("PROGRESS_RELAY_BIN") or str(REPO / ".build" / "debug" / "progress-relay")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise RuntimeError(f"relay binary not found at {path} (run `swift build`, or set "
                           "PROGRESS_RELAY_BIN)")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def short_tmpdir(prefix: str = "prc-") -> Path:
    # Unix socket paths are limited to 107 bytes: pytest's tmp_path can be too long.
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def wait_until(pred: Callable[[], Any], timeout: float, what: str = "condition",
               interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Relay:
    """One `progress-relay serve` process; `socket_path` and `port` stay the same across
    restarts (so emitters and subscribers find it again)."""

    def __init__(self, *extra_args: str, directory: Optional[Path] = None,
                 socket_path: Optional[str] = None):
        self.bin = relay_bin()
        self.dir = directory or short_tmpdir()
        self.socket_path = socket_path or str(self.dir / "p.sock")
        self.port = free_port()
        self.secret = secrets.token_hex(16)
        self.secret_file = str(self.dir / "secret")
        Path(self.secret_file).write_text(self.secret + "\n")
        self.extra_args = list(extra_args)
        self.log_path = self.dir / "relay-stderr.log"
        self.proc: Optional[subprocess.Popen] = None

    @property
    def args(self) -> List[str]:
        return [self.bin, "serve", "--socket", self.socket_path,
                "--listen", f"127.0.0.1:{self.port}", "--jwt-secret-file", self.secret_file,
                "--log-level", "debug", *self.extra_args]

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self, timeout: float = 15.0) -> "Relay":
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROGRESS_RELAY_")}
        with open(self.log_path, "ab") as log:
            log.write(f"===== {' '.join(self.args)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=log, env=env,
                                         cwd=self.dir)
        deadline = time.monotonic() + timeout
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise AssertionError(f"relay exited with {rc}\n{self.log_tail()}")
            if os.path.exists(self.socket_path):
                try:
                    if self.http("/healthz")[0] == 200:
                        return self
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise AssertionError(f"relay not ready after {timeout}s\n{self.log_tail()}")
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> Optional[int]:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def http(self, path: str) -> tuple:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            return r.status, r.read().decode("utf-8", "replace")
        finally:
            conn.close()

    def stats(self) -> dict:
        status, body = self.http("/stats")
        assert status == 200, (status, body)
        return json.loads(body)

    def metrics(self) -> str:
        return self.http("/metrics")[1]

    def rejected_count(self) -> float:
        """progress_relay_events_rejected* samples in /metrics, added up."""
        total = 0.0
        for line in self.metrics().splitlines():
            if line.startswith("progress_relay_events_rejected") and not line.startswith("#"):
                try:
                    total += float(line.rsplit(" ", 1)[1])
                except ValueError:
                    pass
        return total

    def token(self, topics: Iterable[str] = ("*",), sub: str = "tester", ttl: Any = 3600) -> str:
        return progress_relay.token(self.secret, sub, list(topics), ttl)

    def log_tail(self, n: int = 8000) -> str:
        try:
            t = self.log_path.read_text(errors="replace")
        except OSError:
            t = ""
        return f"----- relay stderr ({self.log_path}) -----\n{t[-n:]}"


_SUPPORTS_PROXY = "proxy" in inspect.signature(ws_connect.__init__).parameters


def ws_kwargs() -> Dict[str, Any]:
    kw: Dict[str, Any] = dict(max_size=2 ** 26, max_queue=None, ping_interval=None,
                              open_timeout=5, close_timeout=2, compression=None)
    if _SUPPORTS_PROXY:
        kw["proxy"] = None
    return kw


class Subscriber:
    """A WebSocket subscriber in a thread of its own.

    `events[topic]` holds the events of each topic in arrival order. After a disconnect it
    reconnects (until stopped) and resumes each topic with its epoch and last seq. With
    from_start=True, a topic that already has events when first subscribed is replayed from
    its first event (unsubscribe, then subscribe with since=0: the relay's history must still
    hold them)."""

    def __init__(self, relay: Relay, topics: Iterable[str], from_start: bool = False,
                 token: Optional[str] = None):
        self.relay = relay
        self.topics = list(topics)
        self.from_start = from_start
        self.token = token or relay.token(["*"])
        self.events: Dict[str, List[dict]] = collections.defaultdict(list)
        self.controls: List[dict] = []
        self.epochs: Dict[str, str] = {}
        self.connections = 0
        self.closes: List[Optional[int]] = []
        self._cond = threading.Condition()
        self._live: set = set()
        self._stop = False
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._main, daemon=True, name="subscriber")
        self._thread.start()
        self.wait(lambda: self._live >= set(self.topics), 10, "subscriptions")

    # -- reading, from the test's thread --------------------------------------------------------

    def wait(self, pred: Callable[[], Any], timeout: float, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if self._error is not None:
                    raise AssertionError(f"subscriber failed: {self._error!r}")
                v = pred()
                if v:
                    return v
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"timed out after {timeout}s waiting for {what}; events: "
                        + ", ".join(f"{t}: {len(e)}" for t, e in self.events.items())
                        + f"; last: {self._last_events()}\n{self.relay.log_tail(3000)}")
                self._cond.wait(min(left, 0.2))

    def _last_events(self) -> str:
        return "; ".join(f"{t}: {e[-2:]}" for t, e in self.events.items())

    def wait_count(self, topic: str, n: int, timeout: float = 20) -> List[dict]:
        self.wait(lambda: len(self.events[topic]) >= n, timeout, f"{n} events on {topic}")
        return list(self.events[topic])

    def wait_type(self, topic: str, type_: str, timeout: float = 20) -> dict:
        def found():
            for e in self.events[topic]:
                if e.get("type") == type_:
                    return e
            return None
        return self.wait(found, timeout, f"a {type_!r} event on {topic}")

    def close(self) -> None:
        self._stop = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(lambda: None)
            except RuntimeError:
                pass
        self._thread.join(5)

    # -- the thread -----------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as e:  # reported to the waiting test
            with self._cond:
                self._error = e
                self._cond.notify_all()

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        url = self.relay.url + "?" + urllib.parse.urlencode({"token": self.token})
        first = True
        while not self._stop:
            try:
                ws = await ws_connect(url, **ws_kwargs())
            except (OSError, asyncio.TimeoutError, websockets.exceptions.InvalidHandshake):
                if first:
                    raise
                await asyncio.sleep(0.05)
                continue
            first = False
            self.connections += 1
            try:
                await self._session(ws)
            except ConnectionClosed as e:
                self.closes.append(e.rcvd.code if e.rcvd is not None else None)
            finally:
                with self._cond:
                    self._live.clear()
                await ws.close()

    async def _session(self, ws) -> None:
        state: Dict[str, str] = {}
        for t in self.topics:
            msg: Dict[str, Any] = {"op": "subscribe", "topic": t}
            evs = self.events[t]
            if t in self.epochs and evs:
                msg.update(epoch=self.epochs[t], since=evs[-1]["seq"])
                state[t] = "resume"
            else:
                state[t] = "fresh"
            await ws.send(json.dumps(msg))
        while not self._stop:
            try:
                raw = await asyncio.wait_for(ws.recv(), 0.2)
            except asyncio.TimeoutError:
                continue
            frame = json.loads(raw)
            op = frame.get("op")
            t = frame.get("topic")
            if op is not None:
                with self._cond:
                    self.controls.append(frame)
                if op == "subscribed" and t in state:
                    if "epoch" in frame:
                        self.epochs[t] = frame["epoch"]
                    if (state[t] == "fresh" and self.from_start and frame.get("seq", 0) > 0
                            and not self.events[t]):
                        state[t] = "unsubscribing"
                        await ws.send(json.dumps({"op": "unsubscribe", "topic": t}))
                        continue
                    if state[t] == "resume" and not frame.get("recovered"):
                        raise AssertionError(f"could not resume {t}: {frame}")
                    state[t] = "live"
                    with self._cond:
                        self._live.add(t)
                        self._cond.notify_all()
                elif op == "unsubscribed" and state.get(t) == "unsubscribing":
                    state[t] = "replaying"
                    await ws.send(json.dumps({"op": "subscribe", "topic": t,
                                              "epoch": self.epochs[t], "since": 0}))
                elif op == "error":
                    raise AssertionError(f"error frame: {frame}")
                continue
            if state.get(t) != "live":
                continue     # the newest-event snapshot before a replay from the start
            with self._cond:
                self.events[t].append(frame)
                self._cond.notify_all()


def assert_seq_contiguous(events: List[dict]) -> None:
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"seq not contiguous: {seqs}"
