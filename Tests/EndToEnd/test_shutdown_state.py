"""Contract sections 3 and 5: shutdown, --state-file, epochs across restarts, topic bounds."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time

import pytest

from relaylib import (
    async_test, event_text, expect_close, expect_nothing, recv_event_texts, recv_events,
    give_to_relay_user, recv_json, settle, subscribe, topic_count, ws_connect,
)


def ev(topic: str, i: int) -> bytes:
    return b'{"topic":"%s","i":%d}' % (topic.encode(), i)


# ---------------------------------------------------------------------------------------------
# shutdown

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@async_test
async def test_signal_closes_subscribers_1001_and_exits_0(relay, sig):
    clients = []
    for k in range(3):
        ws = await ws_connect(relay, topics=[f"s{k}"])
        await recv_json(ws)
        clients.append(ws)
    t0 = time.monotonic()
    relay.send_signal(sig)
    for ws in clients:
        frames, code = await expect_close(ws, timeout=5)
        assert code == 1001, code
        assert frames == []
    rc = await asyncio.to_thread(relay.wait, 6)
    assert rc == 0
    assert time.monotonic() - t0 < 5.5


@async_test
async def test_shutdown_publishes_complete_lines_already_written(relay):
    ws = await ws_connect(relay, topics=["sd"])
    await recv_json(ws)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(relay.socket_path)
    lines = [ev("sd", i) for i in range(1, 4)]
    s.sendall(b"\n".join(lines) + b'\n{"topic":"sd","partial":')
    relay.send_signal(signal.SIGTERM)   # the emitter's connection stays open
    frames, code = await expect_close(ws, timeout=5)
    assert code == 1001
    assert [json.dumps(f, separators=(",", ":")) for f in frames] == \
        [event_text(i, l) for i, l in enumerate(lines, start=1)]
    assert await asyncio.to_thread(relay.wait, 6) == 0
    with pytest.raises(OSError):   # the relay is gone: the writer's writes fail
        for _ in range(50):
            s.sendall(b'{"topic":"sd","late":1}\n')
            time.sleep(0.01)
    s.close()


@async_test(timeout=60)
async def test_no_written_line_is_lost_at_shutdown(relay):
    """Every line whose write completed before the relay shut the emitter's reading side
    is published (and delivered) before subscribers get 1001."""
    ws = await ws_connect(relay, topics=["zl"])
    await recv_json(ws)
    written = []
    stop = threading.Event()

    def writer():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(relay.socket_path)
        i = 0
        try:
            while not stop.is_set() and i < 100_000:
                i += 1
                s.sendall(ev("zl", i) + b"\n")
                written.append(i)
                if i % 5 == 0:
                    time.sleep(0.001)
        except OSError:
            pass
        finally:
            s.close()

    t = threading.Thread(target=writer)
    t.start()
    await asyncio.sleep(0.3)
    relay.send_signal(signal.SIGTERM)
    try:
        frames, code = await expect_close(ws, timeout=8)
    finally:
        await asyncio.sleep(0.5)
        stop.set()
        t.join(10)
    assert code == 1001
    got = [f["i"] for f in frames]
    assert got == list(range(1, len(got) + 1)), "gap or reorder"
    assert written, "the writer wrote nothing"
    # writes after the relay shut the reading side fail; every completed write is published
    assert len(got) == len(written), \
        f"{len(written)} lines written, {len(got)} delivered before 1001"
    assert await asyncio.to_thread(relay.wait, 6) == 0


# ---------------------------------------------------------------------------------------------
# state file and epochs

@async_test
async def test_state_file_keeps_epoch_seq_history_across_restart(relay_factory):
    relay = relay_factory(start=False)
    relay.extra_args += ["--state-file", str(relay.dir / "state.json")]
    relay.start()
    lines = [ev("st", i) for i in range(1, 6)]
    ws = await ws_connect(relay, topics=["st"])
    s0 = await recv_json(ws)
    assert await relay.aemit(lines) == []
    await recv_events(ws, 5)
    await ws.close()

    assert relay.stop() == 0
    assert os.path.exists(relay.dir / "state.json"), "no state file written on shutdown"
    relay.start()

    # the newest event survived
    ws = await ws_connect(relay)
    f = await subscribe(ws, "st")
    assert (f["epoch"], f["seq"]) == (s0["epoch"], 5)
    assert await recv_event_texts(ws, 1) == [event_text(5, lines[4])]
    await ws.close()

    # seq continues, and a resume with the old epoch replays what was missed
    more = [ev("st", i) for i in range(6, 8)]
    assert await relay.aemit(more) == []
    await settle(relay, "st", 7)
    ws = await ws_connect(relay)
    f = await subscribe(ws, "st", epoch=s0["epoch"], since=3)
    assert f == {"op": "subscribed", "topic": "st", "epoch": s0["epoch"], "seq": 7,
                 "recovered": True, "ping_interval": 25}
    assert await recv_event_texts(ws, 4) == [event_text(i, (lines + more)[i - 1])
                                             for i in range(4, 8)]
    await expect_nothing(ws, 0.3)


@async_test
async def test_without_state_file_restart_changes_the_epoch(relay):
    ws = await ws_connect(relay, topics=["ns"])
    s0 = await recv_json(ws)
    assert await relay.aemit([ev("ns", i) for i in range(1, 4)]) == []
    await recv_events(ws, 3)
    await ws.close()
    relay.restart()
    ws = await ws_connect(relay)
    f = await subscribe(ws, "ns", epoch=s0["epoch"], since=2)
    assert f["recovered"] is False
    assert f["epoch"] != s0["epoch"]
    assert f["seq"] == 0
    await expect_nothing(ws, 0.3)
    assert await relay.aemit([ev("ns", 9)]) == []
    assert [e["seq"] for e in await recv_events(ws, 1)] == [1]


@async_test
async def test_killed_relay_gets_a_new_epoch_despite_an_old_state_file(relay_factory):
    relay = relay_factory(start=False)
    relay.extra_args += ["--state-file", str(relay.dir / "state.json")]
    relay.start()
    assert await relay.aemit([ev("k", i) for i in range(1, 4)]) == []
    s = await settle(relay, "k", 3)
    assert relay.stop() == 0                      # clean: state written with seq 3
    relay.start()
    assert await relay.aemit([ev("k", i) for i in range(4, 6)]) == []
    s2 = await settle(relay, "k", 5)
    assert s2["epoch"] == s["epoch"]
    relay.kill()                                  # seq 4 and 5 are not in any state file
    relay.start()
    ws = await ws_connect(relay)
    f = await subscribe(ws, "k", epoch=s["epoch"], since=3)
    # an epoch never gives one seq to two events: the old epoch must not come back with seq 3
    assert f["epoch"] != s["epoch"], "a killed relay came back with the old epoch"
    assert f["recovered"] is False


@async_test
async def test_unreadable_state_file_starts_with_a_new_epoch(relay_factory):
    # ARCHITECTURE.md: "with an unreadable one, a new epoch"
    relay = relay_factory(start=False)
    state = relay.dir / "state.json"
    state.write_bytes(b"\x00garbage{{{")
    give_to_relay_user(state)   # as if the relay's user had written it
    relay.extra_args += ["--state-file", str(state)]
    relay.start()
    ws = await ws_connect(relay, topics=["g"])
    f = await recv_json(ws)
    assert f["op"] == "subscribed" and f["seq"] == 0
    assert await relay.aemit([ev("g", 1)]) == []
    assert [e["seq"] for e in await recv_events(ws, 1)] == [1]


# ---------------------------------------------------------------------------------------------
# topic bounds

@async_test(timeout=60)
async def test_max_topics_forgets_the_idle_longest(relay_factory):
    relay = relay_factory("--max-topics", "100")
    keep = await ws_connect(relay, topics=["mt:keep"])
    k0 = await recv_json(keep)
    assert await relay.aemit([ev("mt:keep", 0)]) == []
    await recv_events(keep, 1)
    for start in range(0, 1000, 250):
        assert await relay.aemit([ev(f"mt:{k}", k) for k in range(start, start + 250)]) == []
    await settle(relay, "mt:999", 1)
    n = topic_count(relay)
    assert 1 <= n <= 100, f"{n} topics kept with --max-topics 100"
    # the newest topic is kept, the oldest idle one is forgotten, the subscribed one is kept
    ws = await ws_connect(relay)
    assert (await subscribe(ws, "mt:999"))["seq"] == 1
    assert [e["i"] for e in await recv_events(ws, 1)] == [999]
    f = await subscribe(ws, "mt:0")
    assert f["seq"] == 0
    f = await subscribe(ws, "mt:keep")
    assert (f["epoch"], f["seq"]) == (k0["epoch"], 1)


@pytest.mark.slow
@async_test(timeout=30)
async def test_topic_ttl_forgets_idle_topics(relay_factory):
    relay = relay_factory("--topic-ttl", "1")
    keep = await ws_connect(relay, topics=["tt:keep"])
    await recv_json(keep)
    old = await ws_connect(relay, topics=["tt:0"])
    e_old = (await recv_json(old))["epoch"]
    assert await relay.aemit([ev(f"tt:{k}", k) for k in range(5)] + [ev("tt:keep", 9)]) == []
    await recv_events(old, 1)
    await recv_events(keep, 1)
    await old.close()
    assert topic_count(relay) == 6

    deadline = time.monotonic() + 6
    while topic_count(relay) > 1:
        assert time.monotonic() < deadline, f"still {topic_count(relay)} topics after ~6s"
        await asyncio.sleep(0.2)
    assert topic_count(relay) == 1   # the one with a subscriber stays

    # a forgotten topic that comes back gets a new epoch
    assert await relay.aemit([ev("tt:0", 100)]) == []
    f = await settle(relay, "tt:0", 1)
    assert f["seq"] == 1
    assert f["epoch"] != e_old, "a forgotten topic came back with its old epoch"
    # the subscribed topic kept its state
    assert await relay.aemit([ev("tt:keep", 10)]) == []
    assert [e["seq"] for e in await recv_events(keep, 1)] == [2]
