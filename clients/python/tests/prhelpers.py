"""Test helpers for the Python and shell clients: a real `progress-relay serve` process, and a
WebSocket subscriber (the `websockets` package) that runs in its own thread, collects the events
of its topics, resumes after the relay restarts, and can replay a topic from its first event.

The relay process and the small utilities (free_port, short_tmpdir, wait_until, the binary's
path) are the end-to-end suite's, Tests/EndToEnd/relaylib.py; what is here is only what these
tests need besides. The relay binary is $PROGRESS_RELAY_BIN, else the repository's
.build/debug/progress-relay. As in the end-to-end suite, when the tests run as root the relay runs
unprivileged (relaylib.RELAY_UID:RELAY_GID, no capabilities) in a directory its user owns; the
emitters and subscribers of these tests keep the test's user (root may connect to its socket).
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import json
import shutil
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Callable

import websockets
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

import progress_relay

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent.parent
if str(REPO / "Tests" / "EndToEnd") not in sys.path:
    sys.path.insert(0, str(REPO / "Tests" / "EndToEnd"))

import relaylib  # noqa: E402
from relaylib import free_port, short_tmpdir, wait_until  # noqa: E402,F401  (re-exported)

# The binary's path, checked: RuntimeError when it is missing or not executable.
from relaylib import require_bin as relay_bin  # noqa: E402,F401  (re-exported)


class Relay(relaylib.Relay):
    """relaylib's `progress-relay serve` process (its `socket_path` and `port` stay the same
    across restarts, so emitters and subscribers find it again; the secret is in `secret_file`;
    its stderr in `log_path`), made as these tests make it: `Relay(*extra_args)`, optionally
    with the directory (a short_tmpdir(): given to the relay's user, and removed at cleanup, like
    one of its own) and the ingest socket's path (in a directory the relay's user can write)."""

    def __init__(self, *extra_args: str, directory: Path | None = None,
                 socket_path: str | None = None):
        super().__init__(extra_args, workdir=directory)
        if socket_path is not None:
            self.socket_path = socket_path

    def cleanup(self) -> None:
        super().cleanup()
        shutil.rmtree(self.dir, ignore_errors=True)

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


_SUPPORTS_PROXY = "proxy" in inspect.signature(ws_connect.__init__).parameters


def ws_kwargs() -> dict[str, Any]:
    kw: dict[str, Any] = dict(max_size=2 ** 26, max_queue=None, ping_interval=None,
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
                 token: str | None = None):
        self.relay = relay
        self.topics = list(topics)
        self.from_start = from_start
        # minted by the client library under test, as the tests' own tokens are
        self.token = token or progress_relay.token(relay.secret, "tester", ["*"], 3600)
        self.events: dict[str, list[dict]] = collections.defaultdict(list)
        self.controls: list[dict] = []
        self.epochs: dict[str, str] = {}
        self.connections = 0
        self.closes: list[int | None] = []
        self._cond = threading.Condition()
        self._live: set = set()
        self._stop = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
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

    def wait_count(self, topic: str, n: int, timeout: float = 20) -> list[dict]:
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
        state: dict[str, str] = {}
        for t in self.topics:
            msg: dict[str, Any] = {"op": "subscribe", "topic": t}
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


def assert_seq_contiguous(events: list[dict]) -> None:
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"seq not contiguous: {seqs}"
