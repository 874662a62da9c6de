"""Contract section 5: slow subscribers (--max-outbound-bytes, close 1013) and the heartbeat
(--ping-interval)."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import pytest

from relaylib import (
    RawWS, async_test, ping_pong, recv_events, recv_json, settle, ws_connect,
)

PAD = "x" * 1000


def big_line(topic: str, i: int) -> bytes:
    return b'{"topic":"%s","i":%d,"pad":"%s"}' % (topic.encode(), i, PAD.encode())


# ---------------------------------------------------------------------------------------------
# slow subscriber

@async_test(timeout=120)
async def test_slow_subscriber_is_cut_off_and_others_get_everything(relay_factory):
    relay = relay_factory("--max-outbound-bytes", "65536")
    good = await ws_connect(relay, topics=["slow"])
    assert (await recv_json(good))["op"] == "subscribed"
    bad = RawWS.for_relay(relay, topics=["slow"], rcvbuf=4096)
    assert bad.recv_json()["op"] == "subscribed"
    # from here on, `bad` reads nothing until the end

    total, chunk = 5000, 500
    got = []
    t0 = time.monotonic()
    for start in range(0, total, chunk):
        emitting = asyncio.create_task(
            relay.aemit([big_line("slow", i) for i in range(start, start + chunk)], timeout=60))
        got += await recv_events(good, chunk, timeout=60)
        assert await emitting == []
    elapsed = time.monotonic() - t0
    assert [e["i"] for e in got] == list(range(total))
    assert [e["seq"] for e in got] == list(range(1, total + 1))
    assert elapsed < 30, f"the good subscriber took {elapsed:.1f}s: the slow one held it back?"

    frames, code, how = await asyncio.to_thread(bad.read_until_close, 20)
    bad.close()
    assert len(frames) < total, "the slow subscriber was never cut off"
    if how == "close":
        assert code == 1013, f"slow subscriber closed with {code}, expected 1013"
    seqs = [f.json()["seq"] for f in frames]
    assert seqs == list(range(1, len(seqs) + 1)), "the slow subscriber's frames have a gap"
    # counted in the metrics (slow-subscriber closes)
    slow = sum(float(l.rsplit(None, 1)[1]) for l in relay.metrics().splitlines()
               if l.startswith("progress_relay_") and "slow" in l.split("{")[0].split()[0])
    assert slow >= 1, "no slow-subscriber close counted in /metrics"


@async_test(timeout=60)
async def test_replay_after_subscribe_does_not_count_against_the_bound(relay_factory):
    relay = relay_factory("--max-outbound-bytes", "65536", "--history", "1000")
    n = 1000   # about 1 MB of history, 16 times the bound
    assert await relay.aemit([big_line("rp", i) for i in range(n)]) == []
    s = await settle(relay, "rp", n)
    r = RawWS.for_relay(relay, rcvbuf=8192)
    r.send_json({"op": "subscribe", "topic": "rp", "epoch": s["epoch"], "since": 0})

    def read_all():
        sub = r.recv_json(10)
        evs = [r.recv_json(10) for _ in range(n)]
        return sub, evs

    sub, evs = await asyncio.to_thread(read_all)
    assert sub["op"] == "subscribed" and sub["recovered"] is True
    assert [e["seq"] for e in evs] == list(range(1, n + 1))
    r.send_json({"op": "ping"})
    assert r.recv_json() == {"op": "pong", "type": "pong"}
    r.close()


@async_test(timeout=60)
async def test_pattern_snapshot_does_not_count_against_the_bound(relay_factory):
    relay = relay_factory("--max-outbound-bytes", "65536")
    n = 1000
    assert await relay.aemit([big_line(f"sn:{i}", i) for i in range(n)]) == []
    await settle(relay, f"sn:{n - 1}", 1)
    r = RawWS.for_relay(relay, rcvbuf=8192)
    r.send_json({"op": "subscribe", "topic": "sn:*"})

    def read_all():
        sub = r.recv_json(10)
        evs = [r.recv_json(10) for _ in range(n)]
        return sub, evs

    sub, evs = await asyncio.to_thread(read_all)
    assert sub == {"op": "subscribed", "topic": "sn:*", "seq": 0, "recovered": False, "ping_interval": 25}
    assert sorted(e["i"] for e in evs) == list(range(n))
    r.send_json({"op": "ping"})
    assert r.recv_json() == {"op": "pong", "type": "pong"}
    r.close()


# ---------------------------------------------------------------------------------------------
# heartbeat

class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.slow
@async_test(timeout=30)
async def test_ping_frames_every_interval_and_answering_client_stays(relay_factory):
    relay = relay_factory("--ping-interval", "1")
    logger = logging.getLogger("e2e.heartbeat")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    h = _Collect()
    logger.addHandler(h)
    try:
        ws = await ws_connect(relay, topics=["hb"], logger=logger)
        await recv_json(ws)
        await asyncio.sleep(3.5)
        await ping_pong(ws)   # still open
        pings = [m for m in h.messages if m.startswith("< PING")]
        assert 2 <= len(pings) <= 5, f"{len(pings)} pings in 3.5s with --ping-interval 1"
        assert await relay.aemit([b'{"topic":"hb"}']) == []
        assert await recv_events(ws, 1) == [{"seq": 1, "topic": "hb"}]
    finally:
        logger.removeHandler(h)


@pytest.mark.slow
def test_raw_client_answering_pings_stays_open(relay_factory):
    relay = relay_factory("--ping-interval", "1")
    r = RawWS.for_relay(relay)
    pings = 0
    deadline = time.monotonic() + 3.5
    while time.monotonic() < deadline:
        try:
            f = r.recv_frame(max(0.01, deadline - time.monotonic()))
        except socket.timeout:
            break
        assert f is not None, "closed although it answered every ping"
        assert f.opcode != 0x8, f"closed with {f.close_code} although it answered every ping"
        if f.opcode == 0x9:
            pings += 1
            r.send_frame(0xA, f.payload)
    assert pings >= 2
    r.send_json({"op": "ping"})
    assert r.recv_json() == {"op": "pong", "type": "pong"}
    r.close()


@pytest.mark.slow
def test_client_that_never_answers_pings_is_closed(relay_factory):
    relay = relay_factory("--ping-interval", "1")
    t0 = time.monotonic()
    r = RawWS.for_relay(relay, topics=["hb"])
    pings = 0
    how = None
    while True:
        left = t0 + 8 - time.monotonic()
        assert left > 0, "not closed within 8s with --ping-interval 1"
        try:
            f = r.recv_frame(left)
        except (ConnectionResetError, BrokenPipeError):
            how = "reset"
            break
        except socket.timeout:
            continue
        if f is None:
            how = "eof"
            break
        if f.opcode == 0x9:
            pings += 1
        if f.opcode == 0x8:
            assert f.close_code != 1006
            how = "close"
            break
    elapsed = time.monotonic() - t0
    r.close()
    assert pings >= 1, "closed without ever being pinged"
    assert 1.5 <= elapsed <= 4.5, f"closed after {elapsed:.2f}s ({how}); expected 2-3 intervals"
