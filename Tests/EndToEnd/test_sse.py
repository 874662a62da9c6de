"""GET /sse: server-sent events (docs/protocol.md, "SSE"), with a raw-socket SSE client."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import time

import pytest

from relaylib import wait_until

PAD = "x" * 1000


class SSE:
    """A minimal EventSource: one GET, the response head, then events and comments as they come."""

    def __init__(self, relay, path: str, headers: dict | None = None, rcvbuf: int | None = None,
                 timeout: float = 10.0):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", relay.port))
        lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{relay.port}", "Accept: text/event-stream"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.buf = b""
        self.eof = False
        self.status, self.headers, self.body = self._read_head()

    def _fill(self, timeout: float) -> bool:
        self.sock.settimeout(timeout)
        data = self.sock.recv(65536)
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def _read_head(self):
        deadline = time.monotonic() + 10
        while b"\r\n\r\n" not in self.buf:
            assert self._fill(max(0.1, deadline - time.monotonic())), "closed before the response head"
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
        body = None
        if "content-length" in headers:
            n = int(headers["content-length"])
            while len(self.buf) < n:
                assert self._fill(5)
            body, self.buf = self.buf[:n], self.buf[n:]
        return status, headers, body

    def next_item(self, timeout: float = 10.0):
        """("event", {field: value}) or ("comment", text); None at the end of the stream."""
        deadline = time.monotonic() + timeout
        fields: dict = {}
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                text = line.decode()
                assert "\r" not in text, "a CR inside an SSE line"
                if text == "":
                    if fields:
                        return ("event", fields)
                    continue
                if text.startswith(":"):
                    return ("comment", text[1:].strip())
                name, _, value = text.partition(":")
                value = value[1:] if value.startswith(" ") else value
                fields[name] = fields[name] + "\n" + value if name == "data" and name in fields else value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no complete SSE item in {timeout}s (pending {fields}, {self.buf[:200]!r})")
            try:
                if not self._fill(remaining):
                    return None
            except (ConnectionResetError, TimeoutError, socket.timeout):
                if time.monotonic() >= deadline:
                    raise TimeoutError("no SSE item")
                return None

    def event(self, timeout: float = 10.0, skip_pings: bool = True) -> dict:
        """The next event that has data (the `retry:` block and `: ping` comments are skipped)."""
        while True:
            item = self.next_item(timeout)
            assert item is not None, "the stream ended"
            kind, value = item
            if kind == "comment" and skip_pings:
                continue
            if kind == "event" and "data" not in value:
                continue
            return value

    def events(self, n: int, timeout: float = 30.0) -> list[dict]:
        return [self.event(timeout) for _ in range(n)]

    def rest(self, timeout: float = 20.0) -> list:
        """Every item until the stream ends."""
        items = []
        end = time.monotonic() + timeout
        while True:
            item = self.next_item(max(0.1, end - time.monotonic()))
            if item is None:
                return items
            items.append(item)

    def close(self):
        self.sock.close()


def line(topic: str, i: int, **kw) -> bytes:
    obj = {"topic": topic, "type": "progress", "i": i, **kw}
    return json.dumps(obj, separators=(",", ":")).encode()


def frame_json(seq: int, original: bytes) -> str:
    """What the WebSocket frame carries: `{"seq":N,` and the emitted object after its `{`."""
    return '{"seq":%d,' % seq + original.decode()[1:]


def sse(relay, topic: str, token: str | None = None, query: str = "", headers: dict | None = None, **kw) -> SSE:
    token = relay.token(topics=["*"]) if token is None else token
    path = f"/sse?topic={topic}" + (f"&token={token}" if token else "") + query
    return SSE(relay, path, headers=headers, **kw)


def subscribed(stream: SSE) -> dict:
    ev = stream.event()
    assert ev.get("event") == "subscribed", ev
    return json.loads(ev["data"])


# ---------------------------------------------------------------------------------------------


def test_headers_subscribed_first_newest_then_live_in_order(relay_factory):
    relay = relay_factory()
    lines = [line("t1", i) for i in range(3)]
    assert relay.emit_lines(lines) == []
    s = sse(relay, "t1")
    assert s.status == 200
    assert s.headers["content-type"] == "text/event-stream"
    assert s.headers["cache-control"] == "no-store"
    assert s.headers["x-accel-buffering"] == "no"
    first = s.next_item()
    assert first == ("event", {"retry": "2000"})
    sub = subscribed(s)
    assert sub["op"] == "subscribed" and sub["topic"] == "t1" and sub["seq"] == 3
    assert sub["recovered"] is False
    epoch = sub["epoch"]
    newest = s.event()
    assert newest["id"] == f"{epoch}:3"
    assert newest["data"] == frame_json(3, lines[2])
    assert "event" not in newest
    more = [line("t1", i) for i in range(3, 8)]
    assert relay.emit_lines(more) == []
    got = s.events(5)
    assert [e["id"] for e in got] == [f"{epoch}:{n}" for n in range(4, 9)]
    assert [e["data"] for e in got] == [frame_json(n + 4, more[n]) for n in range(5)]
    s.close()


def test_empty_topic_subscribed_carries_resume_id_and_flag_sets_retry(relay_factory):
    relay = relay_factory("--sse-retry", "750")
    s = sse(relay, "empty")
    assert s.next_item() == ("event", {"retry": "750"})
    ev = s.event()
    sub = json.loads(ev["data"])
    assert sub["seq"] == 0 and ev["id"] == f"{sub['epoch']}:0"
    assert relay.emit_lines([line("empty", 0)]) == []
    assert s.event()["id"] == f"{sub['epoch']}:1"
    s.close()


def test_last_event_id_resume_recovered_true_and_false(relay_factory):
    relay = relay_factory("--history", "3")
    lines = [line("r", i) for i in range(5)]
    assert relay.emit_lines(lines) == []
    s = sse(relay, "r")
    epoch = subscribed(s)["epoch"]
    s.close()

    s = sse(relay, "r", headers={"Last-Event-ID": f"{epoch}:3"})
    sub = subscribed(s)
    assert sub["recovered"] is True and sub["seq"] == 5
    got = s.events(2)
    assert [e["id"] for e in got] == [f"{epoch}:4", f"{epoch}:5"]
    assert got[0]["data"] == frame_json(4, lines[3])
    s.close()

    # older than the history holds: not recovered, the newest event
    s = sse(relay, "r", headers={"Last-Event-ID": f"{epoch}:0"})
    sub = subscribed(s)
    assert sub["recovered"] is False
    assert s.event()["id"] == f"{epoch}:5"
    s.close()

    # another epoch: not recovered
    s = sse(relay, "r", headers={"Last-Event-ID": "nope:4"})
    assert subscribed(s)["recovered"] is False
    assert s.event()["id"] == f"{epoch}:5"
    s.close()


def test_query_epoch_since_and_last_event_id_wins(relay_factory):
    relay = relay_factory()
    assert relay.emit_lines([line("q", i) for i in range(5)]) == []
    s = sse(relay, "q")
    epoch = subscribed(s)["epoch"]
    s.close()
    s = sse(relay, "q", query=f"&epoch={epoch}&since=2")
    assert subscribed(s)["recovered"] is True
    assert [e["id"] for e in s.events(3)] == [f"{epoch}:{n}" for n in (3, 4, 5)]
    s.close()
    # the browser keeps the URL and adds Last-Event-ID: the header is newer
    s = sse(relay, "q", query=f"&epoch={epoch}&since=1", headers={"Last-Event-ID": f"{epoch}:4"})
    assert subscribed(s)["recovered"] is True
    assert s.event()["id"] == f"{epoch}:5"
    s.close()
    s = sse(relay, "q", query="&since=-1")
    assert s.status == 400 and json.loads(s.body)["error"] == "bad_request"


def test_pattern_ids_carry_the_topic_and_reconnect_gets_the_snapshot(relay_factory):
    relay = relay_factory()
    assert relay.emit_lines([line("p:a", 0), line("p:b", 0), line("other", 0)]) == []
    s = sse(relay, "p:*")
    sub = subscribed(s)
    assert sub["seq"] == 0 and "epoch" not in sub
    snap = s.events(2)
    assert [e["id"].split(" ")[0] for e in snap] == ["p:b", "p:a"]
    assert relay.emit_lines([line("p:a", 1)]) == []
    live = s.event()
    topic, position = live["id"].split(" ")
    assert topic == "p:a" and position.endswith(":2")
    assert json.loads(live["data"])["seq"] == 2
    s.close()
    # the browser's reconnect: the same URL and the last id
    s = sse(relay, "p:*", headers={"Last-Event-ID": live["id"]})
    assert subscribed(s)["recovered"] is False
    again = s.events(2)
    assert sorted(e["id"] for e in again) == sorted([live["id"], snap[0]["id"]])
    s.close()


def test_refusals_are_json_before_the_stream(relay_factory):
    relay = relay_factory()
    checks = [
        (sse(relay, "t", token=""), 401, "unauthorized"),
        (sse(relay, "t", token="not.a.jwt"), 401, "unauthorized"),
        (sse(relay, "t", token=relay.token(exp_in=-10)), 401, "unauthorized"),
        (sse(relay, "t", token=relay.token(topics=["mine:*"])), 403, "forbidden"),
        (SSE(relay, "/sse?token=" + relay.token(topics=["*"])), 400, "bad_request"),
    ]
    for stream, status, code in checks:
        assert stream.status == status, (stream.status, stream.body)
        assert stream.headers["content-type"] == "application/json"
        body = json.loads(stream.body)
        assert body["error"] == code and body["message"]
        stream.close()
    # Authorization: Bearer
    s = SSE(relay, "/sse?topic=t", headers={"Authorization": "Bearer " + relay.token(topics=["t"])})
    assert s.status == 200 and subscribed(s)["topic"] == "t"
    s.close()


def test_ticket_is_used_once(relay_factory):
    relay = relay_factory()
    status, _, body = relay.http_full("/ticket", "POST", {"Authorization": "Bearer " + relay.token(topics=["*"])})
    assert status == 200
    ticket = json.loads(body)["ticket"]
    s = SSE(relay, f"/sse?topic=tk&ticket={ticket}")
    assert s.status == 200 and subscribed(s)["topic"] == "tk"
    s.close()
    s = SSE(relay, f"/sse?topic=tk&ticket={ticket}")
    assert s.status == 401 and json.loads(s.body)["error"] == "unauthorized"


def test_cors_with_an_allowed_origin(relay_factory):
    relay = relay_factory("--allow-origin", "https://app.example")
    s = sse(relay, "c", headers={"Origin": "https://app.example"})
    assert s.status == 200
    assert s.headers["access-control-allow-origin"] == "https://app.example"
    assert s.headers["access-control-allow-credentials"] == "true"
    s.close()
    s = sse(relay, "c", headers={"Origin": "https://evil.example"})
    assert s.status == 403 and json.loads(s.body)["error"] == "forbidden"


def test_ping_comments(relay_factory):
    relay = relay_factory("--ping-interval", "1")
    s = sse(relay, "hb")
    subscribed(s)
    t0 = time.monotonic()
    item = s.next_item(5)
    assert item == ("comment", "ping") and time.monotonic() - t0 < 3
    s.close()


def test_token_expiry_ends_the_stream_with_an_error_event(relay_factory):
    relay = relay_factory()
    s = sse(relay, "exp", token=relay.token(topics=["*"], exp_in=3))
    subscribed(s)
    rest = s.rest(timeout=10)
    events = [v for k, v in rest if k == "event"]
    assert events and events[-1]["event"] == "error", rest
    assert json.loads(events[-1]["data"]) == {"op": "error", "code": "unauthorized", "message": "token expired"}
    assert s.eof


def test_slow_subscriber_is_cut_without_holding_back_a_fast_one(relay_factory):
    relay = relay_factory("--max-outbound-bytes", "65536")
    fast = sse(relay, "slow")
    subscribed(fast)
    slow = sse(relay, "slow", rcvbuf=4096)
    subscribed(slow)
    # The test reads the fast stream only between bursts, so one burst must fit what may wait for
    # it: --max-outbound-bytes plus the socket's fixed send buffer (SO_SNDBUF 128 KiB, 256 KiB in
    # the kernel). 50 events of 1 KiB do; 500 did only while the kernel autotuned up to 4 MiB.
    total, chunk = 3000, 50
    got = []
    t0 = time.monotonic()
    for start in range(0, total, chunk):
        assert relay.emit_lines([line("slow", i, pad=PAD) for i in range(start, start + chunk)], timeout=60) == []
        got += fast.events(chunk, timeout=60)
    assert [json.loads(e["data"])["i"] for e in got] == list(range(total))
    assert time.monotonic() - t0 < 30
    items = slow.rest(timeout=20)
    seqs = [json.loads(v["data"])["seq"] for k, v in items if k == "event" and "data" in v]
    assert len(seqs) < total, "the slow stream was never cut"
    assert seqs == list(range(1, len(seqs) + 1))
    wait_until(lambda: relay.stats()["slow_subscriber_closes"] >= 1, 5, what="slow close counted")


def test_counted_as_subscribers(relay_factory):
    relay = relay_factory()
    s = sse(relay, "m")
    subscribed(s)
    stats = relay.stats()
    assert stats["sse_connections"] == 1 and stats["subscriber_connections"] >= 1
    assert "progress_relay_sse_connections 1" in relay.metrics()
    s.close()
    wait_until(lambda: relay.stats()["sse_connections"] == 0, 5, what="stream gone from /stats")


def test_shutdown_ends_streams_cleanly(relay_factory):
    relay = relay_factory()
    s = sse(relay, "bye")
    subscribed(s)
    relay.send_signal(signal.SIGTERM)
    rest = s.rest(timeout=10)
    assert ("comment", "relay shutting down") in rest
    assert s.eof
    assert relay.wait(10) == 0


def test_websocket_and_sse_carry_the_same_json(relay_factory):
    from relaylib import RawWS
    relay = relay_factory()
    ws = RawWS.for_relay(relay, topics=["same"])
    assert ws.recv_json()["op"] == "subscribed"
    s = sse(relay, "same")
    subscribed(s)
    original = b'{"topic":"same","type":"progress","msg":"\\u00e9 \\"q\\"","n":[1,2]}'
    assert relay.emit_lines([original]) == []
    frame = ws.recv_json()
    ev = s.event()
    assert json.loads(ev["data"]) == frame and ev["data"] == frame_json(1, original)
    ws.close()
    s.close()


def test_cluster_mode(relay_factory):
    import redislib
    if not redislib.have_redis():
        pytest.skip("redis-server is not installed")
    server = redislib.RedisServer((), name="redis-sse")
    try:
        server.start()
        relay = relay_factory("--redis", server.url(), "--node-name", "sse")
        wait_until(lambda: relay.http("/readyz")[0] == 200, 15, what="readyz")
        s = sse(relay, "cl")
        sub = subscribed(s)
        epoch = sub["epoch"]
        assert relay.emit_lines([line("cl", i) for i in range(3)]) == []
        got = s.events(3)
        assert [e["id"] for e in got] == [f"{epoch}:{n}" for n in (1, 2, 3)]
        s.close()
        s = sse(relay, "cl", headers={"Last-Event-ID": f"{epoch}:1"})
        assert subscribed(s)["recovered"] is True
        assert [e["id"] for e in s.events(2)] == [f"{epoch}:2", f"{epoch}:3"]
        s.close()
        p = sse(relay, "cl*")
        subscribed(p)
        assert p.event()["id"] == f"cl {epoch}:3"
        p.close()
        relay.stop()
    finally:
        server.cleanup()
