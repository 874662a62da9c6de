"""Issue 15, "Hostile WebSocket clients": each bound a misbehaving client meets (docs/hardening.md,
"WebSocket clients"), with hand-built frames on a raw socket. Every test also keeps a
well-behaved subscriber on the same relay and checks that it went on receiving events."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from relaylib import RawWS, run_cli
from test_protocol_errors import CLOSE, CONT, PING, PONG, TEXT, expect_close_code, raw

RESERVED_CODES = (1005, 1006, 1015)   # RFC 6455 7.4.1: for reporting only, never sent
MIN_FRAGMENT = 16                      # SubscriberPipeline.minimumFragmentBytes
MAX_FRAGMENTS = 128                    # SubscriberPipeline.maxFragments
BURST = 200                            # OperationRate.burst


class Watcher:
    """A well-behaved subscriber of topic `watch`: it answers pings whenever it reads."""

    def __init__(self, relay):
        self.relay = relay
        self.ws = raw(relay, topics=["watch"])
        assert self.ws.recv_json()["op"] == "subscribed"
        self.n = 0

    def check(self):
        """One event through the ingest socket reaches it, in order and at once."""
        self.n += 1
        assert self.relay.emit_lines([{"topic": "watch", "n": self.n}]) == []
        ev = self.ws.recv_json(5)
        assert ev == {"seq": self.n, "topic": "watch", "n": self.n}, ev

    def done(self):
        """One last check, then a clean close, so the relay's shutdown need not wait for it."""
        self.check()
        try:
            self.ws.send_frame(CLOSE, struct.pack("!H", 1000))
            self.ws.read_until_close(2)
        finally:
            self.ws.close()

    def keep_alive(self):
        """Says something, so the heartbeat of a --ping-interval 1 relay keeps it."""
        self.ws.send_json({"op": "ping"})
        assert self.ws.recv_json() == {"op": "pong", "type": "pong"}


@pytest.fixture
def watched(relay):
    w = Watcher(relay)
    w.check()
    yield relay, w
    w.done()


def send_quietly(r: RawWS, data: bytes) -> None:
    """Writes what a hostile client writes; the relay may close before it is all sent."""
    try:
        r.sock.sendall(data)
    except OSError:
        pass


def frames(*specs) -> bytes:
    return b"".join(RawWS.build_frame(op, payload, fin=fin) for op, payload, fin in specs)


def padded_ping(n: int) -> bytes:
    """`{"op":"ping","pad":"xx…"}` of exactly n bytes."""
    head, tail = b'{"op":"ping","pad":"', b'"}'
    return head + b"x" * (n - len(head) - len(tail)) + tail


def fragmented(body: bytes, sizes: list[int]) -> bytes:
    """`body` as frames of the given sizes (the last takes the rest)."""
    out, at = [], 0
    for i, size in enumerate(sizes):
        last = i == len(sizes) - 1
        chunk = body[at:] if last else body[at:at + size]
        out.append((TEXT if i == 0 else CONT, chunk, last))
        at += size
    return frames(*out)


# ---------------------------------------------------------------------------------------------
# 1. fragments: at most 128 a message, each non-final one at least 16 bytes

def test_thousands_of_one_byte_fragments_are_1002(watched):
    relay, w = watched
    r = raw(relay)
    body = padded_ping(3000)
    send_quietly(r, fragmented(body, [1] * 2999 + [1]))
    w.check()
    expect_close_code(r, 1002)


@pytest.mark.parametrize("where", ["first", "middle"])
def test_non_final_fragment_under_16_bytes_is_1002(watched, where):
    relay, w = watched
    r = raw(relay)
    sizes = [MIN_FRAGMENT - 1, 20, 5] if where == "first" else [20, MIN_FRAGMENT - 1, 5]
    send_quietly(r, fragmented(padded_ping(60), sizes))
    expect_close_code(r, 1002)


def test_16_byte_fragments_and_a_1_byte_final_are_accepted(watched):
    relay, w = watched
    r = raw(relay)
    body = padded_ping(MIN_FRAGMENT * 3 + 1)
    r.sock.sendall(fragmented(body, [MIN_FRAGMENT] * 3 + [1]))
    assert r.recv_json() == {"op": "pong", "type": "pong"}


def test_128_fragments_are_accepted_129_are_1002(watched):
    relay, w = watched
    r = raw(relay)
    body = padded_ping(MIN_FRAGMENT * MAX_FRAGMENTS)
    r.sock.sendall(fragmented(body, [MIN_FRAGMENT] * MAX_FRAGMENTS))
    assert r.recv_json() == {"op": "pong", "type": "pong"}
    body = padded_ping(MIN_FRAGMENT * (MAX_FRAGMENTS + 1))
    send_quietly(r, fragmented(body, [MIN_FRAGMENT] * (MAX_FRAGMENTS + 1)))
    w.check()
    expect_close_code(r, 1002)


# ---------------------------------------------------------------------------------------------
# 2. a ping between fragments is answered and the message still assembled

def test_ping_inside_a_fragmented_message_is_answered(watched):
    relay, w = watched
    r = raw(relay)
    body = padded_ping(50)
    r.sock.sendall(frames((TEXT, body[:20], False), (PING, b"mid-message", True),
                          (CONT, body[20:40], False), (CONT, body[40:], True)))
    got = [r.recv_frame(5) for _ in range(2)]
    pongs = [f for f in got if f.opcode == PONG]
    texts = [f for f in got if f.opcode == TEXT]
    assert [f.payload for f in pongs] == [b"mid-message"], got
    assert [f.json() for f in texts] == [{"op": "pong", "type": "pong"}], got
    w.check()


# ---------------------------------------------------------------------------------------------
# 3. close frames: malformed ones are errors; a good one is echoed once

BAD_CLOSES = [
    (b"\x03", 1002, "1-byte-body"),
    *[(struct.pack("!H", c), 1002, f"code-{c}")
      for c in (0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535)],
    (struct.pack("!H", 1000) + b"bad \xff reason", 1007, "reason-not-utf8"),
    (struct.pack("!H", 1000) + b"\xed\xa0\x80", 1007, "reason-surrogate"),
]


@pytest.mark.parametrize("body,code", [(b, c) for b, c, _ in BAD_CLOSES],
                         ids=[i for _, _, i in BAD_CLOSES])
def test_malformed_client_close(watched, body, code):
    relay, w = watched
    r = raw(relay)
    r.send_frame(CLOSE, body)
    expect_close_code(r, code)


@pytest.mark.parametrize("code,echo", [(1000, 1000), (1001, 1001), (1003, 1000), (1012, 1000),
                                       (3000, 1000), (4999, 1000), (None, 1000)])
def test_client_close_is_echoed_once(watched, code, echo):
    relay, w = watched
    r = raw(relay)
    r.send_frame(CLOSE, b"" if code is None else struct.pack("!H", code) + "bye ✓".encode())
    f = r.recv_frame(5)
    assert f is not None and f.opcode == CLOSE and f.close_code == echo, f
    # a second close from the client gets no second answer; the relay only hangs up
    send_quietly(r, RawWS.build_frame(CLOSE, struct.pack("!H", 1000)))
    try:
        rest = r.recv_frame(5)
    except (ConnectionResetError, BrokenPipeError):
        rest = None
    assert rest is None, f"a frame after the close handshake: {rest}"
    r.close()


def test_relay_never_sends_reserved_close_codes(relay):
    """Across every way this file ends a connection, the relay's close frames carry a code, and
    never one of 1005, 1006, 1015."""
    w = Watcher(relay)
    cases = [
        (frames((TEXT, b"x", False), (CONT, b"y", True)), 1002),
        (fragmented(padded_ping(MIN_FRAGMENT * 130), [MIN_FRAGMENT] * 130), 1002),
        *[(RawWS.build_frame(CLOSE, body), code) for body, code, _ in BAD_CLOSES],
        (RawWS.build_frame(CLOSE, struct.pack("!H", 1005)), 1002),
        (RawWS.build_frame(CLOSE, b""), 1000),
        (RawWS.build_frame(CLOSE, struct.pack("!H", 1001)), 1001),
        (RawWS.build_frame(TEXT, b"\xff"), 1007),
        (RawWS.build_frame(PING, b"x", fin=False), 1002),
        (RawWS.build_frame(TEXT, b"ping") * (BURST + 50), 1008),
        (RawWS.build_frame(PING, b"p") * (BURST + 50), 1008),
    ]
    sent = []
    for data, want in cases:
        r = raw(relay)
        send_quietly(r, data)
        _, code, how = r.read_until_close(5)
        r.close()
        assert how == "close", f"no close frame for {data[:20]!r}…: {how}"
        sent.append(code)
        assert code == want, f"{data[:20]!r}…: close code {code}, expected {want}"
    assert not set(sent) & set(RESERVED_CODES), sent
    w.done()


# ---------------------------------------------------------------------------------------------
# 4. ping flood: one pong per read batch, with the newest payload; pings count as operations

def test_ping_flood_gets_one_pong_with_the_newest_payload(watched):
    relay, w = watched
    r = raw(relay)
    n = 50
    r.sock.sendall(b"".join(RawWS.build_frame(PING, b"p%d" % i) for i in range(n)))
    r.send_json({"op": "ping"})   # its answer marks the end of the pongs
    pongs = []
    while True:
        f = r.recv_frame(5)
        assert f is not None and f.opcode in (PONG, TEXT), f
        if f.opcode == TEXT:
            break
        pongs.append(f.payload)
    assert pongs and pongs[-1] == b"p%d" % (n - 1), pongs
    assert len(pongs) < n // 2, f"{len(pongs)} pongs for {n} pings sent at once"
    w.check()


def test_ping_frame_flood_is_1008(watched):
    relay, w = watched
    r = raw(relay)
    send_quietly(r, RawWS.build_frame(PING, b"flood") * 2000)
    w.check()
    expect_close_code(r, 1008)


# ---------------------------------------------------------------------------------------------
# 5. operation rate: 100 a second, bursts of 200; past it 1008

def test_a_burst_within_the_rate_is_answered(watched):
    relay, w = watched
    r = raw(relay)
    n = BURST - 10
    r.sock.sendall(RawWS.build_frame(TEXT, b"ping") * n)
    for _ in range(n):
        assert r.recv_json() == {"op": "pong", "type": "pong"}
    w.check()
    r.send_json({"op": "ping"})
    assert r.recv_json() == {"op": "pong", "type": "pong"}


def test_text_ping_flood_is_1008(watched):
    relay, w = watched
    r = raw(relay)
    send_quietly(r, RawWS.build_frame(TEXT, b"ping") * 5000)
    w.check()
    frames_, code, how = r.read_until_close(10)
    assert how == "close" and code == 1008, (how, code)
    assert BURST <= len(frames_) < 5000, len(frames_)
    r.close()


def test_ten_thousand_subscribe_unsubscribe_ops_are_1008(watched):
    relay, w = watched
    r = raw(relay)
    ops = []
    for i in range(5000):
        ops.append(RawWS.build_frame(TEXT, b'{"op":"subscribe","topic":"churn:%d"}' % i))
        ops.append(RawWS.build_frame(TEXT, b'{"op":"unsubscribe","topic":"churn:%d"}' % i))
    send_quietly(r, b"".join(ops))
    w.check()
    frames_, code, how = r.read_until_close(10)
    assert how == "close" and code == 1008, (how, code)
    assert len(frames_) < 10_000
    r.close()
    # the relay holds none of them any more
    w.check()


def test_client_that_never_reads_its_answers_is_1013(relay_factory):
    relay = relay_factory("--max-outbound-bytes", "65536")
    w = Watcher(relay)
    r = RawWS.for_relay(relay, rcvbuf=4096)
    assert r.status == 101
    # each answer (error unknown_op) repeats the 60 kB op: 150 of them owe about 9 MB
    op = b'{"op":"' + b"x" * 60_000 + b'"}'
    send_quietly(r, RawWS.build_frame(TEXT, op) * 150)
    w.check()
    frames_, code, how = r.read_until_close(20)
    r.close()
    assert len(frames_) < 150, "never cut off"
    if how == "close":
        assert code == 1013, code
    slow = [l for l in relay.metrics().splitlines()
            if l.startswith("progress_relay_") and "slow" in l.split("{")[0].split()[0]]
    assert sum(float(l.rsplit(None, 1)[1]) for l in slow) >= 1, slow
    w.done()


# ---------------------------------------------------------------------------------------------
# 6. a frame trickled a byte a second ends with the heartbeat

def test_trickled_frame_is_closed_by_the_heartbeat(relay_factory):
    relay = relay_factory("--ping-interval", "1")
    w = Watcher(relay)
    r = raw(relay)
    t0 = time.monotonic()
    frame = RawWS.build_frame(TEXT, padded_ping(100))
    closed_after = None
    for i in range(len(frame)):
        if time.monotonic() - t0 > 8:
            break
        try:
            r.sock.sendall(frame[i:i + 1])
        except OSError:
            closed_after = time.monotonic() - t0
            break
        w.keep_alive()
        deadline = time.monotonic() + 1
        try:
            while (left := deadline - time.monotonic()) > 0:
                f = r.recv_frame(left)   # pings, unanswered: a frame is half-sent
                if f is None or f.opcode == CLOSE:
                    assert f is None or f.close_code not in RESERVED_CODES, f
                    closed_after = time.monotonic() - t0
                    break
        except socket.timeout:
            pass
        except (ConnectionResetError, BrokenPipeError):
            closed_after = time.monotonic() - t0
        if closed_after is not None:
            break
    r.close()
    assert closed_after is not None, "a trickling client was never closed"
    assert closed_after < 4, f"closed after {closed_after:.1f}s with --ping-interval 1"
    w.done()


# ---------------------------------------------------------------------------------------------
# 7. pattern subscriptions: per connection and relay-wide

def subscribe(r: RawWS, topic: str) -> dict:
    r.send_json({"op": "subscribe", "topic": topic})
    return r.recv_json()


def assert_too_many(answer: dict, topic: str):
    assert answer["op"] == "error" and answer["code"] == "too_many_subscriptions", answer
    assert answer["topic"] == topic, answer


def test_pattern_subscriptions_per_connection_default_8(watched):
    relay, w = watched
    r = raw(relay)
    for i in range(8):
        assert subscribe(r, f"p{i}:*")["op"] == "subscribed"
    assert subscribe(r, "p0:*")["op"] == "subscribed"   # held already: not one more
    assert_too_many(subscribe(r, "p8:*"), "p8:*")
    # the connection stays, and exact topics are still fine
    assert subscribe(r, "exact")["op"] == "subscribed"
    r.send_json({"op": "unsubscribe", "topic": "p3:*"})
    assert r.recv_json() == {"op": "unsubscribed", "topic": "p3:*"}
    assert subscribe(r, "p8:*")["op"] == "subscribed"
    w.check()


def test_pattern_subscriptions_relay_wide(relay_factory):
    relay = relay_factory("--max-pattern-subscriptions", "3", "--max-pattern-subscriptions-total", "5")
    w = Watcher(relay)
    a, b = raw(relay), raw(relay)
    for t in ("a1:*", "a2:*", "a3:*"):
        assert subscribe(a, t)["op"] == "subscribed"
    assert_too_many(subscribe(a, "a4:*"), "a4:*")            # this connection's bound
    for t in ("b1:*", "b2:*"):
        assert subscribe(b, t)["op"] == "subscribed"
    assert_too_many(subscribe(b, "b3:*"), "b3:*")            # the relay's bound
    assert_too_many(subscribe(b, "a1:*"), "a1:*")            # a prefix others hold counts too
    b.send_json({"op": "ping"})
    assert b.recv_json() == {"op": "pong", "type": "pong"}   # still open
    # released by an unsubscribe...
    a.send_json({"op": "unsubscribe", "topic": "a1:*"})
    assert a.recv_json() == {"op": "unsubscribed", "topic": "a1:*"}
    assert subscribe(b, "b3:*")["op"] == "subscribed"
    # ...and by a connection that goes away
    a.send_frame(CLOSE, struct.pack("!H", 1000))
    a.read_until_close(5)
    a.close()
    c = raw(relay)
    for t in ("c1:*", "c2:*"):
        assert subscribe(c, t)["op"] == "subscribed"
    assert_too_many(subscribe(c, "c3:*"), "c3:*")
    # the refused patterns deliver nothing, the held ones do
    assert relay.emit_lines([{"topic": "c3:x"}, {"topic": "c1:x"}]) == []
    assert c.recv_json() == {"seq": 1, "topic": "c1:x"}
    w.done()


@pytest.mark.parametrize("flag", ["--max-pattern-subscriptions", "--max-pattern-subscriptions-total"])
def test_pattern_flags_are_validated(relay_factory, flag):
    relay = relay_factory(flag, "-1", start=False)
    done = relay.run_to_exit()
    assert done.returncode == 2, done
    err = done.stderr.decode("utf-8", "replace")
    assert flag in err and "at least 0" in err, err


def test_pattern_flags_from_the_environment_and_in_help(relay_factory):
    relay = relay_factory(env={"PROGRESS_RELAY_MAX_PATTERN_SUBSCRIPTIONS": "1",
                               "PROGRESS_RELAY_MAX_PATTERN_SUBSCRIPTIONS_TOTAL": "2"})
    a, b = raw(relay), raw(relay)
    assert subscribe(a, "a:*")["op"] == "subscribed"
    assert_too_many(subscribe(a, "b:*"), "b:*")
    assert subscribe(b, "b:*")["op"] == "subscribed"
    assert_too_many(subscribe(raw(relay), "c:*"), "c:*")
    text = (lambda cp: (cp.stdout + cp.stderr).decode())(run_cli(["serve", "--help"]))
    assert "--max-pattern-subscriptions" in text and "--max-pattern-subscriptions-total" in text
