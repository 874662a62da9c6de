"""Contract section 4: the Unix ingest socket."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time

import pytest

from relaylib import (
    assert_error_answers, async_test, event_text, expect_nothing, recv_event_texts, recv_events,
    recv_json, stats_number, ws_connect,
)

T = "ing"
GOOD1 = b'{"topic":"ing","n":1}'
GOOD2 = b'{"topic":"ing","n":2}'


async def _subscriber(relay, *topics):
    ws = await ws_connect(relay, topics=topics or [T])
    for t in topics or [T]:
        f = await recv_json(ws)
        assert f["op"] == "subscribed", f
    return ws


BAD_LINES = {
    # not JSON
    "not-json-word": b"hello",
    "not-json-truncated": b'{"topic":"ing"',
    "not-json-trailing-comma": b'{"topic":"ing",}',
    "not-json-single-quotes": b"{'topic':'ing'}",
    "not-json-trailing-garbage": b'{"topic":"ing"}}',
    "not-json-two-objects": b'{"topic":"ing"} {"topic":"ing"}',
    "not-json-nan": b'{"topic":"ing","n":NaN}',
    "not-json-leading-zero": b'{"topic":"ing","n":01}',
    "not-json-raw-tab-in-string": b'{"topic":"ing","s":"a\tb"}',
    "not-json-bad-escape": b'{"topic":"ing","s":"\\x"}',
    # not an object
    "array": b'[{"topic":"ing"}]',
    "string": b'"ing"',
    "number": b"42",
    "null": b"null",
    "true": b"true",
    # invalid UTF-8
    "utf8-ff": b'{"topic":"ing","m":"\xff"}',
    "utf8-overlong": b'{"topic":"ing","m":"\xc0\xaf"}',
    "utf8-surrogate": b'{"topic":"ing","m":"\xed\xa0\x80"}',
    "utf8-truncated-seq": b'{"topic":"ing","m":"\xe2\x82"}',
    "utf8-in-key": b'{"topic":"ing","\xfe":1}',
    # topic missing or invalid
    "topic-missing": b'{"type":"progress","progress":1}',
    "empty-object": b"{}",
    "topic-empty": b'{"topic":""}',
    "topic-number": b'{"topic":5}',
    "topic-null": b'{"topic":null}',
    "topic-array": b'{"topic":["ing"]}',
    "topic-object": b'{"topic":{"a":"ing"}}',
    "topic-space": b'{"topic":"in g"}',
    "topic-hash": b'{"topic":"ing#1"}',
    "topic-star": b'{"topic":"ing*"}',
    "topic-non-ascii": '{"topic":"ingé"}'.encode(),
    "topic-escaped-newline": b'{"topic":"ing\\n"}',
    "topic-257-bytes": b'{"topic":"' + b"t" * 257 + b'"}',
    # type
    "type-number": b'{"topic":"ing","type":5}',
    "type-null": b'{"topic":"ing","type":null}',
    "type-bool": b'{"topic":"ing","type":true}',
    "type-array": b'{"topic":"ing","type":["progress"]}',
    "type-object": b'{"topic":"ing","type":{"a":1}}',
    "type-65-bytes": b'{"topic":"ing","type":"' + b"y" * 65 + b'"}',
    # given twice
    "topic-twice": b'{"topic":"ing","topic":"ing"}',
    "topic-twice-other-value": b'{"topic":"ing","n":1,"topic":"other"}',
    "topic-twice-escaped": b'{"topic":"ing","to\\u0070ic":"ing"}',
    "topic-twice-escaped-first": b'{"\\u0074opic":"ing","topic":"ing"}',
    "type-twice": b'{"topic":"ing","type":"a","type":"b"}',
    "type-twice-escaped": b'{"topic":"ing","type":"a","typ\\u0065":"b"}',
    # reserved fields
    "seq": b'{"topic":"ing","seq":1}',
    "seq-null": b'{"topic":"ing","seq":null}',
    "seq-escaped": b'{"topic":"ing","s\\u0065q":1}',
    "op": b'{"topic":"ing","op":"subscribed"}',
    "op-first": b'{"op":"x","topic":"ing"}',
}


@pytest.mark.parametrize("bad", list(BAD_LINES.values()), ids=list(BAD_LINES))
@async_test
async def test_bad_line_is_answered_and_neighbours_delivered(relay, bad):
    ws = await _subscriber(relay)
    answers = await relay.aemit([GOOD1, bad, GOOD2])
    assert_error_answers(answers, [2])
    texts = await recv_event_texts(ws, 2)
    assert texts == [event_text(1, GOOD1), event_text(2, GOOD2)]
    await expect_nothing(ws, 0.3)


@async_test
async def test_line_numbers_count_every_line_of_the_connection(relay):
    lines = [
        b'{"topic":"ing","i":1}',
        b"not json",
        b'{"topic":"ing","i":3}',
        b'{"topic":"bad topic"}',
        b'{"topic":"ing","seq":5}',
        b'{"topic":"ing","i":6}',
        b"[]",
        b'{"topic":"ing","i":8}',
        b'{"topic":"ing","i":9}',
        b'{"topic":"ing","op":"x"}',
        b'{"topic":"ing","i":11}',
    ]
    ws = await _subscriber(relay)
    answers = await relay.aemit(lines)
    assert_error_answers(answers, [2, 4, 5, 7, 10])
    events = await recv_events(ws, 6)
    assert [e["i"] for e in events] == [1, 3, 6, 8, 9, 11]
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5, 6]
    await expect_nothing(ws, 0.3)


@async_test
async def test_line_numbers_restart_at_one_per_connection(relay):
    a1 = await relay.aemit([b'{"topic":"ing"}', b"bad"])
    a2 = await relay.aemit([b"bad", b'{"topic":"ing"}'])
    assert_error_answers(a1, [2])
    assert_error_answers(a2, [1])


@async_test
async def test_valid_lines_get_no_answer(relay):
    answers = await relay.aemit([{"topic": "ing", "i": i} for i in range(50)])
    assert answers == []


GOOD_EDGE_LINES = {
    "topic-256-bytes": b'{"topic":"' + b"t" * 256 + b'"}',
    "topic-all-allowed-chars":
        b'{"topic":"AZaz09_-.:/@=ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"}',
    "type-64-bytes": b'{"topic":"ing","type":"' + b"y" * 64 + b'"}',
    "reserved-names-nested": b'{"topic":"ing","data":{"topic":"x","seq":1,"op":"y","type":5}}',
    "reserved-names-in-array": b'{"topic":"ing","list":[{"seq":1},{"op":"z"}]}',
    "reserved-names-as-values": b'{"topic":"ing","k":"seq","o":"op"}',
    "topic-not-first": b'{"type":"progress","progress":60,"topic":"ing"}',
    "key-with-other-escape": b'{"topic":"ing","k\\u0065y":"v"}',
    "similar-key-names": b'{"topic":"ing","topics":1,"seqs":2,"opt":3,"types":4,"Topic":5}',
}


@pytest.mark.parametrize("line", list(GOOD_EDGE_LINES.values()), ids=list(GOOD_EDGE_LINES))
@async_test
async def test_edge_lines_that_are_valid(relay, line):
    topic = json.loads(line)["topic"]
    ws = await _subscriber(relay, topic)
    answers = await relay.aemit([line])
    assert answers == []
    texts = await recv_event_texts(ws, 1)
    assert texts == [event_text(1, line)]


RAW_CONTENT = [
    b'{"topic":"ing","a":1}',
    b'{ "topic" : "ing" ,\t"b" : [ 1 , 2 ]  ,"c":{ } }',
    '{"topic":"ing","msg":"héllo wörld ✓ 😀 中文",'
    '"esc":"\\u00e9\\ud83d\\ude00\\n\\"q\\"\\\\"}'.encode(),
    b'{"topic":"ing","n":{"deep":{"deeper":[{"x":null},true,false,-0,1.50,1E+2,'
    b'12345678901234567890123,-1.0e-7]}}}',
    b'{"topic":"ing","z":1,"a":2,"m":3,"a2":[],"e":""}',
    b'{"topic":"ing","type":"progress","progress":60,"message":"3/5"}',
]


@async_test
async def test_content_is_delivered_byte_for_byte(relay):
    ws = await _subscriber(relay)
    answers = await relay.aemit(RAW_CONTENT)
    assert answers == []
    texts = await recv_event_texts(ws, len(RAW_CONTENT))
    for i, (got, line) in enumerate(zip(texts, RAW_CONTENT), start=1):
        assert got == event_text(i, line)


@async_test
async def test_crlf_line_ends_are_accepted(relay):
    ws = await _subscriber(relay)
    data = b'{"topic":"ing","n":1}\r\n{"topic":"ing","n":2}\n{"topic":"ing","n":3}\r\nbad\r\n'
    answers = await relay.aemit_raw(data)
    assert_error_answers(answers, [4])
    texts = await recv_event_texts(ws, 3)
    assert texts == ['{"seq":1,"topic":"ing","n":1}', '{"seq":2,"topic":"ing","n":2}',
                     '{"seq":3,"topic":"ing","n":3}']


@async_test
async def test_partial_last_line_is_never_published(relay):
    ws = await _subscriber(relay)
    await relay.aemit_raw(b'{"topic":"ing","n":1}\n{"topic":"ing","n":2}')
    texts = await recv_event_texts(ws, 1)
    assert texts == ['{"seq":1,"topic":"ing","n":1}']
    await expect_nothing(ws, 0.5)
    # the next event gets seq 2: the partial one took no number
    await relay.aemit([b'{"topic":"ing","n":3}'])
    texts = await recv_event_texts(ws, 1)
    assert texts == ['{"seq":2,"topic":"ing","n":3}']


@async_test
async def test_partial_line_dropped_when_connection_closes_without_half_close(relay):
    ws = await _subscriber(relay)

    def send():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(relay.socket_path)
        s.sendall(b'{"topic":"ing","n":1}\n{"topic":"ing","n":2,"pad":"')
        time.sleep(0.1)
        s.close()

    await asyncio.to_thread(send)
    assert await recv_event_texts(ws, 1) == ['{"seq":1,"topic":"ing","n":1}']
    await expect_nothing(ws, 0.5)


@async_test
async def test_line_split_across_many_writes_is_one_event(relay):
    ws = await _subscriber(relay)
    line = b'{"topic":"ing","msg":"' + "é✓".encode() * 50 + b'"}\n'

    def send():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(relay.socket_path)
        for i in range(0, len(line), 7):   # splits multi-byte characters too
            s.sendall(line[i:i + 7])
            time.sleep(0.002)
        s.shutdown(socket.SHUT_WR)
        assert s.recv(100) == b""
        s.close()

    await asyncio.to_thread(send)
    assert await recv_event_texts(ws, 1) == [event_text(1, line)]


@async_test(timeout=90)
async def test_many_emitter_connections_each_in_order(relay):
    conns, per_conn = 20, 500
    ws = await _subscriber(relay)
    errors: list = []

    def emitter(c: int, barrier: threading.Barrier):
        try:
            lines = [b'{"topic":"ing","c":%d,"i":%d}\n' % (c, i) for i in range(per_conn)]
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(30)
            s.connect(relay.socket_path)
            barrier.wait()
            for k in range(0, per_conn, 25):
                s.sendall(b"".join(lines[k:k + 25]))
            s.shutdown(socket.SHUT_WR)
            rest = b""
            while True:
                b = s.recv(4096)
                if not b:
                    break
                rest += b
            s.close()
            if rest:
                errors.append((c, rest))
        except Exception as e:  # noqa: BLE001
            errors.append((c, repr(e)))

    def run_all():
        barrier = threading.Barrier(conns)
        ts = [threading.Thread(target=emitter, args=(c, barrier)) for c in range(conns)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)

    task = asyncio.create_task(asyncio.to_thread(run_all))
    events = await recv_events(ws, conns * per_conn, timeout=60)
    await task
    assert errors == []
    assert [e["seq"] for e in events] == list(range(1, conns * per_conn + 1))
    by_conn: dict[int, list[int]] = {}
    for e in events:
        by_conn.setdefault(e["c"], []).append(e["i"])
    assert sorted(by_conn) == list(range(conns))
    for c, seen in by_conn.items():
        assert seen == list(range(per_conn)), f"connection {c} out of order or incomplete"
    await expect_nothing(ws, 0.3)


@async_test
async def test_line_longer_than_max_event_bytes_is_rejected(relay_factory):
    relay = relay_factory("--max-event-bytes", "1000")
    ws = await _subscriber(relay)

    def line_of(n: int, i: int) -> bytes:
        head = b'{"topic":"ing","i":%d,"pad":"' % i
        line = head + b"x" * (n - len(head) - 2) + b'"}'
        assert len(line) == n
        return line

    lines = [line_of(100, 1), line_of(5000, 2), line_of(999, 3), line_of(1002, 4),
             line_of(200_000, 5), line_of(50, 6)]
    answers = await relay.aemit(lines)
    assert_error_answers(answers, [2, 4, 5])
    texts = await recv_event_texts(ws, 3)
    assert texts == [event_text(1, lines[0]), event_text(2, lines[2]), event_text(3, lines[5])]
    await expect_nothing(ws, 0.3)


@async_test
async def test_max_event_bytes_boundary(relay_factory):
    # Assumption: the limit counts the line without its "\n" (or "\r\n").
    relay = relay_factory("--max-event-bytes", "1000")
    ws = await _subscriber(relay)
    head = b'{"topic":"ing","pad":"'
    exact = head + b"x" * (1000 - len(head) - 2) + b'"}'
    over = head + b"x" * (1001 - len(head) - 2) + b'"}'
    assert (len(exact), len(over)) == (1000, 1001)
    answers = await relay.aemit([exact, over, exact])
    assert_error_answers(answers, [2])
    assert await recv_event_texts(ws, 2) == [event_text(1, exact), event_text(2, exact)]


@async_test
async def test_default_max_event_bytes_is_64k(relay):
    ws = await _subscriber(relay)
    head = b'{"topic":"ing","pad":"'
    fits = head + b"x" * (60_000) + b'"}'
    too_long = head + b"x" * (70_000) + b'"}'
    answers = await relay.aemit([fits, too_long, b'{"topic":"ing","n":3}'])
    assert_error_answers(answers, [2])
    texts = await recv_event_texts(ws, 2)
    assert texts == [event_text(1, fits), '{"seq":2,"topic":"ing","n":3}']


@async_test(timeout=60)
async def test_sender_that_never_reads_answers_does_not_block_the_relay(relay):
    ws = await _subscriber(relay)
    n_bad = 30_000   # about 1 MB of answers: far more than the socket buffers hold

    def flood():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(20)   # a relay blocked on writing answers would stop reading: sendall fails
        s.connect(relay.socket_path)
        s.sendall(b"bad line\n" * n_bad + b'{"topic":"ing","after":"flood"}\n')
        return s   # never read, keep open until the event arrived

    s = await asyncio.to_thread(flood)
    try:
        events = await recv_events(ws, 1, timeout=20)
        assert events == [{"seq": 1, "topic": "ing", "after": "flood"}]
        # other emitters are still served
        assert await relay.aemit([b'{"topic":"ing","n":2}']) == []
        assert (await recv_events(ws, 1))[0] == {"seq": 2, "topic": "ing", "n": 2}
    finally:
        s.close()


@async_test
async def test_rejected_line_is_logged_with_sender_pid(relay):
    before = len(relay.log_text())
    answers = await relay.aemit([b"definitely not json"])
    assert_error_answers(answers, [1])
    pid = str(os.getpid())

    def logged():
        new = relay.log_text()[before:]
        return any(pid in line for line in new.splitlines())

    deadline = time.monotonic() + 3
    while not logged():
        assert time.monotonic() < deadline, \
            f"no log line with the emitter's pid {pid} after a rejected line:\n" \
            f"{relay.log_text()[before:][-3000:]}"
        await asyncio.sleep(0.05)


@async_test(timeout=90)
async def test_emitters_wait_at_the_inflight_bound_and_nothing_is_lost(relay_factory):
    # A bound far smaller than one read: every burst spends it, so each emitter connection is
    # held back (by the kernel, once the relay stops reading) until the subscriber loops have
    # written what is in flight. Every event still arrives once, in order, on every subscriber.
    r = relay_factory("--max-inflight-bytes", "1024")
    topics, per_topic = ["bp:a", "bp:b", "bp:c", "bp:d"], 2000
    subscribers = [await ws_connect(r, topics=[t]) for t in topics]
    everything = await ws_connect(r, topics=["bp:*"])
    for ws in [*subscribers, everything]:
        assert (await recv_json(ws))["op"] == "subscribed"
    assert stats_number(r.stats(), "ingest_paused") == 0

    errors: list = []

    def emitter(topic: str):
        try:
            pad = b"x" * 100
            body = b"".join(b'{"topic":"%s","n":%d,"pad":"%s"}\n' % (topic.encode(), n, pad)
                            for n in range(1, per_topic + 1))
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(60)
                s.connect(r.socket_path)
                s.sendall(body)
                s.shutdown(socket.SHUT_WR)
                answer = s.recv(4096)
            if answer:
                errors.append((topic, answer))
        except Exception as e:  # noqa: BLE001
            errors.append((topic, repr(e)))

    threads = [threading.Thread(target=emitter, args=(t,)) for t in topics]
    for t in threads:
        t.start()
    for topic, ws in zip(topics, subscribers):
        events = await recv_events(ws, per_topic, timeout=60)
        assert [(e["seq"], e["n"]) for e in events] == [(n, n) for n in range(1, per_topic + 1)], topic
    merged = await recv_events(everything, len(topics) * per_topic, timeout=60)
    for topic in topics:
        assert [e["n"] for e in merged if e["topic"] == topic] == list(range(1, per_topic + 1)), topic
    for t in threads:
        t.join(30)
    assert errors == []
    paused = stats_number(r.stats(), "ingest_paused")
    assert paused and paused > 0, "the emitters were never held back: the bound was not exercised"
    assert f"progress_relay_ingest_paused_total {paused}" in r.metrics()
