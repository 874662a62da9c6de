"""Contract section 5: delivery over the WebSocket at GET /ws (subscriptions, resume, patterns,
control frames)."""

from __future__ import annotations

import asyncio
import json

import pytest

from relaylib import (
    async_test, event_text, expect_nothing, ping_pong, recv_event_texts, recv_events, recv_json,
    recv_text, send_json, settle, subscribe, ws_connect,
)

SUBSCRIBED_KEYS = {"op", "topic", "epoch", "seq", "recovered"}
# The first `subscribed` of a connection also tells the relay's --ping-interval (seconds).
FIRST_SUBSCRIBED_KEYS = SUBSCRIBED_KEYS | {"ping_interval"}
PING = {"ping_interval": 25}


def ev(topic: str, i: int, **kw) -> bytes:
    d = {"topic": topic, "i": i, **kw}
    return json.dumps(d, separators=(",", ":")).encode()


async def emit_n(relay, topic: str, first: int, last: int) -> None:
    answers = await relay.aemit([ev(topic, i) for i in range(first, last + 1)])
    assert answers == []


async def current_epoch(relay, topic: str) -> str:
    ws = await ws_connect(relay)
    f = await subscribe(ws, topic)
    await ws.close()
    return f["epoch"]


# ---------------------------------------------------------------------------------------------
# event frames

@async_test
async def test_event_frame_is_the_emitted_object_with_seq_in_front(relay):
    ws = await ws_connect(relay)
    await subscribe(ws, "task:42")
    line = b'{"topic":"task:42","type":"progress","progress":60,"message":"3/5"}'
    assert await relay.aemit([line]) == []
    text = await recv_text(ws)
    assert text == '{"seq":1,"topic":"task:42","type":"progress","progress":60,"message":"3/5"}'


@async_test
async def test_seq_counts_from_one_per_topic(relay):
    ws = await ws_connect(relay)
    await subscribe(ws, "a")
    await subscribe(ws, "b")
    lines = []
    for i in range(1, 6):
        lines += [ev("a", i), ev("b", i), ev("b", i)]
    assert await relay.aemit(lines) == []
    events = await recv_events(ws, 15)
    a = [e for e in events if e["topic"] == "a"]
    b = [e for e in events if e["topic"] == "b"]
    assert [e["seq"] for e in a] == [1, 2, 3, 4, 5]
    assert [e["seq"] for e in b] == list(range(1, 11))
    for e in events:
        assert "op" not in e
        assert list(e)[0] == "seq"


@async_test
async def test_every_subscriber_of_a_topic_gets_every_event(relay):
    clients = []
    for _ in range(5):
        ws = await ws_connect(relay, topics=["fan"])
        assert (await recv_json(ws))["op"] == "subscribed"
        clients.append(ws)
    other = await ws_connect(relay, topics=["not-fan"])
    await recv_json(other)
    lines = [ev("fan", i) for i in range(20)]
    assert await relay.aemit(lines) == []
    want = [event_text(i + 1, l) for i, l in enumerate(lines)]
    for ws in clients:
        assert await recv_event_texts(ws, 20) == want
    await expect_nothing(other, 0.2)


@async_test
async def test_large_event_is_delivered_intact(relay):
    ws = await ws_connect(relay, topics=["big"])
    await recv_json(ws)
    line = b'{"topic":"big","blob":"' + b"0123456789abcdef" * 3900 + b'"}'
    assert len(line) < 65536
    assert await relay.aemit([line]) == []
    assert await recv_event_texts(ws, 1) == [event_text(1, line)]


# ---------------------------------------------------------------------------------------------
# subscribed frames and the newest event

@async_test
async def test_subscribed_frame_for_a_new_topic(relay):
    ws = await ws_connect(relay)
    await send_json(ws, {"op": "subscribe", "topic": "fresh"})
    f = await recv_json(ws)
    assert set(f) == FIRST_SUBSCRIBED_KEYS, f
    assert f["op"] == "subscribed" and f["topic"] == "fresh" and f["ping_interval"] == 25
    assert f["seq"] == 0 and f["recovered"] is False
    assert isinstance(f["epoch"], str) and f["epoch"]
    await expect_nothing(ws, 0.3)
    assert await relay.aemit([ev("fresh", 1)]) == []
    assert (await recv_events(ws, 1))[0]["seq"] == 1


@async_test
async def test_new_subscriber_gets_only_the_newest_event(relay):
    lines = [ev("t", i) for i in range(1, 4)]
    assert await relay.aemit(lines) == []
    await settle(relay, "t", 3)
    ws = await ws_connect(relay)
    await send_json(ws, {"op": "subscribe", "topic": "t"})
    f = await recv_json(ws)
    assert set(f) == FIRST_SUBSCRIBED_KEYS, f
    assert (f["seq"], f["recovered"]) == (3, False)
    assert await recv_event_texts(ws, 1) == [event_text(3, lines[2])]
    await expect_nothing(ws, 0.3)


@async_test
async def test_epoch_is_stable_while_the_relay_runs(relay):
    await emit_n(relay, "t", 1, 2)
    await settle(relay, "t", 2)
    e1 = await current_epoch(relay, "t")
    await emit_n(relay, "t", 3, 4)
    await settle(relay, "t", 4)
    assert await current_epoch(relay, "t") == e1


# ---------------------------------------------------------------------------------------------
# resume

@async_test
async def test_resume_with_same_epoch_replays_exactly_the_missed_events(relay):
    ws = await ws_connect(relay)
    s = await subscribe(ws, "t")
    lines = [ev("t", i) for i in range(1, 7)]
    assert await relay.aemit(lines[:3]) == []
    assert len(await recv_events(ws, 3)) == 3
    await ws.close()
    assert await relay.aemit(lines[3:]) == []
    await settle(relay, "t", 6)

    ws = await ws_connect(relay)
    f = await subscribe(ws, "t", epoch=s["epoch"], since=3)
    assert set(f) == FIRST_SUBSCRIBED_KEYS
    assert f == {"op": "subscribed", "topic": "t", "epoch": s["epoch"], "seq": 6,
                 "recovered": True, **PING}
    assert await recv_event_texts(ws, 3) == [event_text(i, lines[i - 1]) for i in (4, 5, 6)]
    await expect_nothing(ws, 0.3)
    assert await relay.aemit([ev("t", 7)]) == []
    assert [e["seq"] for e in await recv_events(ws, 1)] == [7]


@async_test
async def test_resume_when_nothing_was_missed(relay):
    # Assumption: since == newest seq with the right epoch: every event after `since` (none)
    # is held, so recovered is true and nothing is replayed.
    await emit_n(relay, "t", 1, 4)
    s = await settle(relay, "t", 4)
    ws = await ws_connect(relay)
    f = await subscribe(ws, "t", epoch=s["epoch"], since=4)
    assert (f["seq"], f["recovered"]) == (4, True)
    await expect_nothing(ws, 0.3)


@async_test
async def test_resume_while_events_keep_coming_has_no_gap_and_no_duplicate(relay):
    await emit_n(relay, "t", 1, 10)
    s = await settle(relay, "t", 10)
    ws = await ws_connect(relay)

    async def produce():
        for k in range(11, 211, 10):
            await emit_n(relay, "t", k, k + 9)

    task = asyncio.create_task(produce())
    await asyncio.sleep(0.005)
    f = await subscribe(ws, "t", epoch=s["epoch"], since=10)
    assert f["recovered"] is True
    events = await recv_events(ws, 200, timeout=20)
    await task
    assert [e["seq"] for e in events] == list(range(11, 211))
    assert [e["i"] for e in events] == list(range(11, 211))
    await expect_nothing(ws, 0.3)


@pytest.mark.parametrize("since, recovered, expect", [
    (5, True, [6, 7, 8, 9, 10]),    # history holds 6..10: everything after 5
    (7, True, [8, 9, 10]),
    (4, False, [10]),               # 5 is gone: not resumable, newest only
    (1, False, [10]),
])
@async_test
async def test_history_keeps_exactly_n_events(relay_factory, since, recovered, expect):
    relay = relay_factory("--history", "5")
    lines = [ev("h", i) for i in range(1, 11)]
    assert await relay.aemit(lines) == []
    s = await settle(relay, "h", 10)
    ws = await ws_connect(relay)
    f = await subscribe(ws, "h", epoch=s["epoch"], since=since)
    assert f == {"op": "subscribed", "topic": "h", "epoch": s["epoch"], "seq": 10,
                 "recovered": recovered, **PING}
    texts = await recv_event_texts(ws, len(expect))
    assert texts == [event_text(i, lines[i - 1]) for i in expect]
    await expect_nothing(ws, 0.3)


@async_test
async def test_default_history_is_100(relay):
    assert await relay.aemit([ev("h", i) for i in range(1, 151)]) == []
    s = await settle(relay, "h", 150)
    ws = await ws_connect(relay)
    f = await subscribe(ws, "h", epoch=s["epoch"], since=50)
    assert f["recovered"] is True
    assert [e["seq"] for e in await recv_events(ws, 100)] == list(range(51, 151))
    await expect_nothing(ws, 0.2)
    ws2 = await ws_connect(relay)
    f = await subscribe(ws2, "h", epoch=s["epoch"], since=49)
    assert f["recovered"] is False
    assert [e["seq"] for e in await recv_events(ws2, 1)] == [150]
    await expect_nothing(ws2, 0.2)


@pytest.mark.parametrize("epoch", ["not-the-epoch", None], ids=["wrong-epoch", "no-epoch"])
@async_test
async def test_since_without_the_right_epoch_gives_the_newest_event(relay, epoch):
    lines = [ev("t", i) for i in range(1, 6)]
    assert await relay.aemit(lines) == []
    s = await settle(relay, "t", 5)
    ws = await ws_connect(relay)
    f = await subscribe(ws, "t", epoch=epoch, since=2)
    assert f == {"op": "subscribed", "topic": "t", "epoch": s["epoch"], "seq": 5,
                 "recovered": False, **PING}
    assert await recv_event_texts(ws, 1) == [event_text(5, lines[4])]
    await expect_nothing(ws, 0.3)


# ---------------------------------------------------------------------------------------------
# patterns

@async_test
async def test_pattern_snapshot_most_recent_first_then_live(relay):
    lines = [ev("task:1", 1), ev("task:2", 2), ev("task:3", 3), ev("other:1", 4),
             ev("task:1", 5), ev("taskx", 6)]
    assert await relay.aemit(lines) == []
    await settle(relay, "taskx", 1)
    ws = await ws_connect(relay)
    await send_json(ws, {"op": "subscribe", "topic": "task:*"})
    f = await recv_json(ws)
    assert f == {"op": "subscribed", "topic": "task:*", "seq": 0, "recovered": False, **PING}
    snap = await recv_event_texts(ws, 3)
    assert snap == [event_text(2, lines[4]), event_text(1, lines[2]), event_text(1, lines[1])]
    await expect_nothing(ws, 0.3)

    live = [ev("other:2", 7), ev("task:9", 8), ev("task:3", 9), ev("task", 10)]
    assert await relay.aemit(live) == []
    got = await recv_event_texts(ws, 2)
    assert got == [event_text(1, live[1]), event_text(2, live[2])]
    await expect_nothing(ws, 0.3)


@async_test
async def test_star_alone_matches_every_topic(relay):
    assert await relay.aemit([ev("a", 1), ev("b:c", 2)]) == []
    await settle(relay, "b:c", 1)
    ws = await ws_connect(relay)
    f = await subscribe(ws, "*")
    assert f == {"op": "subscribed", "topic": "*", "seq": 0, "recovered": False, **PING}
    snap = await recv_events(ws, 2)
    assert [e["topic"] for e in snap] == ["b:c", "a"]
    assert await relay.aemit([ev("zz", 3)]) == []
    assert (await recv_events(ws, 1))[0] == {"seq": 1, "topic": "zz", "i": 3}


@async_test
async def test_pattern_has_no_resume(relay):
    await emit_n(relay, "p:1", 1, 3)
    s = await settle(relay, "p:1", 3)
    ws = await ws_connect(relay)
    await send_json(ws, {"op": "subscribe", "topic": "p:*", "epoch": s["epoch"], "since": 1})
    f = await recv_json(ws)
    assert f == {"op": "subscribed", "topic": "p:*", "seq": 0, "recovered": False, **PING}
    assert [e["seq"] for e in await recv_events(ws, 1)] == [3]
    await expect_nothing(ws, 0.3)


@async_test(timeout=60)
async def test_pattern_snapshot_holds_at_most_1000_topics(relay):
    n = 1005
    assert await relay.aemit([ev(f"snap:{k}", k) for k in range(n)]) == []
    await settle(relay, f"snap:{n - 1}", 1)
    ws = await ws_connect(relay)
    await subscribe(ws, "snap:*")
    snap = await recv_events(ws, 1000, timeout=20)
    assert [e["i"] for e in snap] == list(range(n - 1, n - 1001, -1))
    await expect_nothing(ws, 0.5)


@async_test
async def test_pattern_via_url_topic(relay):
    ws = await ws_connect(relay, topics=["job:*"])
    f = await recv_json(ws)
    assert f == {"op": "subscribed", "topic": "job:*", "seq": 0, "recovered": False, **PING}
    assert await relay.aemit([ev("job:1", 1), ev("jobs", 2), ev("job:2", 3)]) == []
    assert [e["i"] for e in await recv_events(ws, 2)] == [1, 3]


# ---------------------------------------------------------------------------------------------
# unsubscribe

@async_test
async def test_unsubscribe_stops_events(relay):
    ws = await ws_connect(relay)
    await subscribe(ws, "t")
    await subscribe(ws, "z")
    await send_json(ws, {"op": "unsubscribe", "topic": "t"})
    assert await recv_json(ws) == {"op": "unsubscribed", "topic": "t"}
    assert await relay.aemit([ev("t", 1), ev("z", 2)]) == []
    # t's event would come before z's: the next frame must be z's
    assert await recv_events(ws, 1) == [{"seq": 1, "topic": "z", "i": 2}]
    await expect_nothing(ws, 0.3)


@async_test
async def test_unsubscribe_a_pattern(relay):
    ws = await ws_connect(relay)
    await subscribe(ws, "p:*")
    await subscribe(ws, "z")
    await send_json(ws, {"op": "unsubscribe", "topic": "p:*"})
    assert await recv_json(ws) == {"op": "unsubscribed", "topic": "p:*"}
    assert await relay.aemit([ev("p:1", 1), ev("z", 2)]) == []
    assert await recv_events(ws, 1) == [{"seq": 1, "topic": "z", "i": 2}]


# ---------------------------------------------------------------------------------------------
# URL topics

@async_test
async def test_url_topics_are_repeatable(relay):
    assert await relay.aemit([ev("u1", 1)]) == []
    await settle(relay, "u1", 1)
    ws = await ws_connect(relay, topics=["u1", "u2"])
    frames = [await recv_json(ws) for _ in range(3)]
    subs = {f["topic"]: f for f in frames if f.get("op") == "subscribed"}
    assert set(subs) == {"u1", "u2"}
    assert subs["u1"]["seq"] == 1 and subs["u2"]["seq"] == 0
    # The first answered (u1, the first in the URL) carries ping_interval, the other not.
    assert set(subs["u1"]) == FIRST_SUBSCRIBED_KEYS and set(subs["u2"]) == SUBSCRIBED_KEYS
    for f in subs.values():
        assert f["recovered"] is False
    evs = [f for f in frames if "op" not in f]
    assert evs == [{"seq": 1, "topic": "u1", "i": 1}]
    # the event of u1 comes after u1's subscribed frame
    assert frames.index(evs[0]) > frames.index(subs["u1"])
    assert await relay.aemit([ev("u2", 2), ev("u1", 3), ev("u3", 4)]) == []
    got = await recv_events(ws, 2)
    assert got == [{"seq": 1, "topic": "u2", "i": 2}, {"seq": 2, "topic": "u1", "i": 3}]
    await expect_nothing(ws, 0.3)


@async_test
async def test_url_topic_subscriber_receives_events(relay):
    ws = await ws_connect(relay, topics=["only"])
    f = await recv_json(ws)
    assert f["op"] == "subscribed" and f["topic"] == "only" and f["seq"] == 0
    lines = [ev("only", i) for i in range(10)]
    assert await relay.aemit(lines) == []
    assert await recv_event_texts(ws, 10) == [event_text(i + 1, l) for i, l in enumerate(lines)]


# ---------------------------------------------------------------------------------------------
# control frames

@pytest.mark.parametrize("frame", ["ping", '{"op":"ping"}', '{"op":"ping","future":[1,2]}'])
@async_test
async def test_ping_answers_pong(relay, frame):
    ws = await ws_connect(relay)
    await ws.send(frame)
    assert await recv_text(ws) in ('{"op":"pong","type":"pong"}', '{"type":"pong","op":"pong"}')
    await ws.send(frame)
    assert await recv_json(ws) == {"op": "pong", "type": "pong"}


@async_test
async def test_unknown_op_is_an_error_and_the_connection_stays(relay):
    ws = await ws_connect(relay)
    await send_json(ws, {"op": "frobnicate", "topic": "t"})
    f = await recv_json(ws)
    assert f["op"] == "error" and f["code"] == "unknown_op", f
    assert isinstance(f.get("message"), str)
    assert set(f) <= {"op", "code", "message", "topic"}
    await ping_pong(ws)
    await subscribe(ws, "t")


BAD_REQUESTS = {
    "not-json": "hello there",
    "broken-json": '{"op":"subscribe",',
    "array": '["subscribe","t"]',
    "string": '"ping!"',
    "number": "17",
    "no-op": '{"topic":"t"}',
    "subscribe-no-topic": '{"op":"subscribe"}',
    "subscribe-topic-number": '{"op":"subscribe","topic":7}',
    "subscribe-topic-empty": '{"op":"subscribe","topic":""}',
    "subscribe-topic-invalid-chars": '{"op":"subscribe","topic":"a b"}',
    "subscribe-since-string": '{"op":"subscribe","topic":"t","since":"x"}',
    "subscribe-epoch-number": '{"op":"subscribe","topic":"t","epoch":5,"since":1}',
    "unsubscribe-no-topic": '{"op":"unsubscribe"}',
}


@pytest.mark.parametrize("frame", list(BAD_REQUESTS.values()), ids=list(BAD_REQUESTS))
@async_test
async def test_bad_request_is_an_error_and_the_connection_stays(relay, frame):
    ws = await ws_connect(relay)
    await ws.send(frame)
    f = await recv_json(ws)
    assert f["op"] == "error" and f["code"] == "bad_request", f
    assert isinstance(f.get("message"), str)
    await ping_pong(ws)


# `since` that is no whole number from 0 up: the message says what is wrong with it (issue 12)
BAD_SINCE = {
    "negative": ("-1", "since must not be negative"),
    "fraction": ("0.5", "since must be a whole number"),
    "too-large": ("1e400", "since"),
    "numeric-string": ('"3"', "since must be a number"),
}


@pytest.mark.parametrize("since", list(BAD_SINCE), ids=list(BAD_SINCE))
@async_test
async def test_bad_since_is_a_bad_request_that_names_since(relay, since):
    value, words = BAD_SINCE[since]
    ws = await ws_connect(relay)
    s = await subscribe(ws, "t")
    await ws.send('{"op":"subscribe","topic":"u","epoch":"%s","since":%s}' % (s["epoch"], value))
    f = await recv_json(ws)
    assert f["op"] == "error" and f["code"] == "bad_request", f
    assert words in f.get("message", ""), f
    # the connection stays usable, the bad frame subscribed nothing
    await ping_pong(ws)
    await subscribe(ws, "v")
    assert await relay.aemit([ev("u", 1), ev("t", 2)]) == []
    assert await recv_events(ws, 1) == [{"seq": 1, "topic": "t", "i": 2}]


@async_test
async def test_extra_fields_in_client_frames_are_ignored(relay):
    ws = await ws_connect(relay)
    await send_json(ws, {"op": "subscribe", "topic": "t", "v": 2, "options": {"x": 1}})
    f = await recv_json(ws)
    assert f["op"] == "subscribed" and f["topic"] == "t"
    await send_json(ws, {"op": "unsubscribe", "topic": "t", "reason": "bored"})
    assert await recv_json(ws) == {"op": "unsubscribed", "topic": "t"}


@async_test
async def test_max_subscriptions(relay_factory):
    relay = relay_factory("--max-subscriptions", "3")
    ws = await ws_connect(relay, topics=["a"])
    assert (await recv_json(ws))["op"] == "subscribed"
    await subscribe(ws, "b")
    await subscribe(ws, "c:*")
    await send_json(ws, {"op": "subscribe", "topic": "d"})
    f = await recv_json(ws)
    assert f["op"] == "error" and f["code"] == "too_many_subscriptions", f
    assert f.get("topic") == "d"
    await ping_pong(ws)
    # d is not subscribed
    assert await relay.aemit([ev("d", 1), ev("a", 2)]) == []
    assert await recv_events(ws, 1) == [{"seq": 1, "topic": "a", "i": 2}]
    # after an unsubscribe there is room again
    await send_json(ws, {"op": "unsubscribe", "topic": "b"})
    assert await recv_json(ws) == {"op": "unsubscribed", "topic": "b"}
    await subscribe(ws, "d")


@async_test
async def test_max_subscriptions_counts_url_topics(relay_factory):
    relay = relay_factory("--max-subscriptions", "2")
    ws = await ws_connect(relay, topics=["a", "b"])
    assert [(await recv_json(ws))["op"] for _ in range(2)] == ["subscribed", "subscribed"]
    await send_json(ws, {"op": "subscribe", "topic": "c"})
    f = await recv_json(ws)
    assert f["op"] == "error" and f["code"] == "too_many_subscriptions", f


@async_test
async def test_default_max_subscriptions_is_100(relay):
    ws = await ws_connect(relay)
    for k in range(100):
        await send_json(ws, {"op": "subscribe", "topic": f"m{k}"})
    for k in range(100):
        f = await recv_json(ws)
        assert f["op"] == "subscribed", (k, f)
    await send_json(ws, {"op": "subscribe", "topic": "m100"})
    f = await recv_json(ws)
    assert f["op"] == "error" and f["code"] == "too_many_subscriptions", f
