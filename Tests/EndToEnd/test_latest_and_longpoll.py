"""Issue 16 section 2: `GET /topics/{topic}` (the newest event, ETag) and
`GET /topics/{topic}/events?epoch=&since=&wait=` (long-poll), docs/protocol.md "Topics over plain HTTP".

Plain http.client against a real relay. A poll that waits runs in a thread; what is checked about
it is only that it is answered after the event that answers it was emitted, never a duration
(except that wait=1 with nothing to say is answered with an empty list at all)."""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
import urllib.parse

import pytest

from relaylib import wait_until

TOPIC = "task:42"


def get(relay, path, headers=None, method="GET", timeout=15.0):
    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=timeout)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        raw = resp.read()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        body = json.loads(raw) if raw and headers.get("content-type", "").startswith("application/json") else raw
        return resp.status, headers, body
    finally:
        conn.close()


def auth(relay, topics=("*",), sub="u1"):
    return {"Authorization": "Bearer " + relay.token(sub=sub, topics=list(topics))}


def q(topic):
    return urllib.parse.quote(topic, safe="")


class Poll(threading.Thread):
    """One GET in a thread; `result` is (status, headers, body) or the exception."""

    def __init__(self, relay, path, headers):
        super().__init__(daemon=True)
        self.relay, self.path, self.headers = relay, path, headers
        self.result = None
        self.answered_at = None

    def run(self):
        try:
            self.result = get(self.relay, self.path, self.headers, timeout=70)
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.result = e
        self.answered_at = time.monotonic()


def waiters(relay):
    return json.loads(relay.http("/stats")[1])["longpoll_waiters"]


# --------------------------------------------------------------------------------------------
# GET /topics/{topic}

def test_latest_event_shape_and_headers(relay):
    relay.emit_lines([{"topic": TOPIC, "type": "progress", "progress": 10},
                      {"topic": TOPIC, "type": "progress", "progress": 60, "message": "3/5"}])
    status, headers, body = get(relay, f"/topics/{TOPIC}", auth(relay))
    assert status == 200, body
    assert set(body) == {"topic", "epoch", "seq", "event"}
    assert body["topic"] == TOPIC and body["seq"] == 2 and isinstance(body["epoch"], str)
    # the event as the WebSocket event frame carries it: seq first, then the emitted object
    assert body["event"] == {"seq": 2, "topic": TOPIC, "type": "progress", "progress": 60, "message": "3/5"}
    assert headers["etag"] == f'"{body["epoch"]}:2"'
    assert headers["cache-control"] == "no-cache"
    assert headers["content-type"] == "application/json"


def test_latest_token_in_query(relay):
    relay.emit_lines([{"topic": TOPIC, "progress": 1}])
    tok = relay.token(topics=[TOPIC])
    status, _, body = get(relay, f"/topics/{TOPIC}?token={tok}")
    assert status == 200 and body["seq"] == 1


def test_unknown_topic_is_404_json(relay):
    status, headers, body = get(relay, "/topics/never-emitted", auth(relay))
    assert status == 404
    assert body["error"] == "not_found"
    assert headers["content-type"] == "application/json"


def test_etag_and_304(relay):
    relay.emit_lines([{"topic": TOPIC, "progress": 1}])
    _, headers, _ = get(relay, f"/topics/{TOPIC}", auth(relay))
    tag = headers["etag"]
    status, h304, body = get(relay, f"/topics/{TOPIC}", {**auth(relay), "If-None-Match": tag})
    assert status == 304 and body == b""
    assert h304["etag"] == tag and h304["cache-control"] == "no-cache"
    # a list, and a weak form, match too
    status, _, _ = get(relay, f"/topics/{TOPIC}", {**auth(relay), "If-None-Match": f'"x:1", W/{tag}'})
    assert status == 304
    relay.emit_lines([{"topic": TOPIC, "progress": 2}])
    status, headers, body = get(relay, f"/topics/{TOPIC}", {**auth(relay), "If-None-Match": tag})
    assert status == 200 and body["seq"] == 2 and headers["etag"] != tag


def test_401_and_403(relay):
    relay.emit_lines([{"topic": TOPIC, "progress": 1}, {"topic": "other:1", "progress": 1}])
    for headers in ({}, {"Authorization": "Bearer nope"},
                    {"Authorization": "Bearer " + relay.token(secret="x" * 40)}):
        status, h, body = get(relay, f"/topics/{TOPIC}", headers)
        assert status == 401 and body["error"] == "unauthorized", headers
        assert h["www-authenticate"] == "Bearer"
        status, _, body = get(relay, f"/topics/{TOPIC}/events", headers)
        assert status == 401 and body["error"] == "unauthorized"
    status, _, body = get(relay, "/topics/other:1", auth(relay, topics=["task:*"]))
    assert status == 403 and body["error"] == "forbidden"
    status, _, body = get(relay, "/topics/other:1/events?wait=5", auth(relay, topics=["task:*"]))
    assert status == 403 and body["error"] == "forbidden"
    # an ungranted topic the relay does not hold is 403 as well, not 404: no probing of names
    status, _, body = get(relay, "/topics/other:2", auth(relay, topics=["task:*"]))
    assert status == 403


def test_cors(relay_factory):
    relay = relay_factory("--allow-origin", "https://app.example")
    relay.emit_lines([{"topic": TOPIC, "progress": 1}])
    status, headers, _ = get(relay, f"/topics/{TOPIC}", {**auth(relay), "Origin": "https://app.example"})
    assert status == 200
    assert headers["access-control-allow-origin"] == "https://app.example"
    assert "ETag" in headers["access-control-expose-headers"]
    status, _, body = get(relay, f"/topics/{TOPIC}", {**auth(relay), "Origin": "https://evil.example"})
    assert status == 403 and body["error"] == "forbidden"
    status, headers, _ = get(relay, f"/topics/{TOPIC}/events", {"Origin": "https://app.example"}, method="OPTIONS")
    assert status == 204
    assert headers["access-control-allow-origin"] == "https://app.example"
    assert "Authorization" in headers["access-control-allow-headers"]
    assert "GET" in headers["access-control-allow-methods"]
    # no Origin (not a browser): no CORS headers, still served
    status, headers, _ = get(relay, f"/topics/{TOPIC}", auth(relay))
    assert status == 200 and "access-control-allow-origin" not in headers


def test_percent_encoded_topic(relay):
    topic = "user:7/build@x=1"
    relay.emit_lines([{"topic": topic, "progress": 3}])
    status, _, body = get(relay, f"/topics/{q(topic)}", auth(relay))
    assert status == 200 and body["topic"] == topic and body["event"]["progress"] == 3
    # `:` raw, the rest encoded
    status, _, body = get(relay, "/topics/user:7%2Fbuild%40x%3D1", auth(relay))
    assert status == 200 and body["topic"] == topic
    status, _, body = get(relay, f"/topics/{q(topic)}/events?since=0&epoch={body['epoch']}", auth(relay))
    assert status == 200 and [e["progress"] for e in body["events"]] == [3]
    # a raw `/` splits the path: this is no route
    status, _, _ = get(relay, "/topics/user:7/build@x=1", auth(relay))
    assert status == 404


@pytest.mark.parametrize("path", ["/topics/task%4", "/topics/task%zz1", "/topics/task%", "/topics/%G1/events"])
def test_malformed_escape_is_400(relay, path):
    status, _, body = get(relay, path, auth(relay))
    assert status == 400 and body["error"] == "bad_request"


def test_bad_query_is_400(relay):
    relay.emit_lines([{"topic": TOPIC, "progress": 1}])
    for query in ("since=-1", "since=x", "wait=61", "wait=-1", "wait=1.5"):
        status, _, body = get(relay, f"/topics/{TOPIC}/events?{query}", auth(relay))
        assert status == 400 and body["error"] == "bad_request", query


def test_requests_are_counted(relay):
    relay.emit_lines([{"topic": TOPIC, "progress": 1}])
    get(relay, f"/topics/{TOPIC}", auth(relay))
    get(relay, f"/topics/{TOPIC}/events", auth(relay))
    _, metrics = relay.http("/metrics")
    assert 'progress_relay_http_requests_total{route="topic"} 1' in metrics
    assert 'progress_relay_http_requests_total{route="topic_events"} 1' in metrics
    assert "progress_relay_longpoll_waiters 0" in metrics


# --------------------------------------------------------------------------------------------
# GET /topics/{topic}/events

def test_events_after_since_at_once(relay):
    relay.emit_lines([{"topic": TOPIC, "progress": p} for p in (10, 20, 30, 40)])
    _, _, latest = get(relay, f"/topics/{TOPIC}", auth(relay))
    epoch = latest["epoch"]
    status, headers, body = get(relay, f"/topics/{TOPIC}/events?epoch={epoch}&since=2&wait=25", auth(relay))
    assert status == 200
    assert headers["cache-control"] == "no-cache"
    assert body == {"topic": TOPIC, "epoch": epoch, "seq": 4, "recovered": True,
                    "events": [{"seq": 3, "topic": TOPIC, "progress": 30}, {"seq": 4, "topic": TOPIC, "progress": 40}]}
    # without since: the newest event, recovered false, as a subscribe without since
    status, _, body = get(relay, f"/topics/{TOPIC}/events", auth(relay))
    assert status == 200 and body["recovered"] is False and [e["seq"] for e in body["events"]] == [4]


def test_waits_then_answered_by_new_event(relay):
    relay.emit_lines([{"topic": TOPIC, "progress": 1}])
    _, _, latest = get(relay, f"/topics/{TOPIC}", auth(relay))
    poll = Poll(relay, f"/topics/{TOPIC}/events?epoch={latest['epoch']}&since=1&wait=30", auth(relay))
    poll.start()
    wait_until(lambda: waiters(relay) == 1, 10, what="the poll to wait")
    assert poll.result is None
    emitted_at = time.monotonic()
    relay.emit_lines([{"topic": TOPIC, "progress": 2, "message": "next"}])
    poll.join(20)
    status, _, body = poll.result
    assert poll.answered_at >= emitted_at
    assert status == 200 and body["recovered"] is True and body["seq"] == 2
    assert body["events"] == [{"seq": 2, "topic": TOPIC, "progress": 2, "message": "next"}]
    wait_until(lambda: waiters(relay) == 0, 5, what="the waiter to be gone")


def test_waits_for_first_event_of_unknown_topic(relay):
    poll = Poll(relay, "/topics/fresh:1/events?wait=30", auth(relay))
    poll.start()
    wait_until(lambda: waiters(relay) == 1, 10, what="the poll to wait")
    relay.emit_lines([{"topic": "fresh:1", "progress": 5}])
    poll.join(20)
    status, _, body = poll.result
    assert status == 200 and [e["progress"] for e in body["events"]] == [5]


def test_timeout_answers_empty_list(relay):
    relay.emit_lines([{"topic": TOPIC, "progress": 1}])
    _, _, latest = get(relay, f"/topics/{TOPIC}", auth(relay))
    status, _, body = get(relay, f"/topics/{TOPIC}/events?epoch={latest['epoch']}&since=1&wait=1", auth(relay))
    assert status == 200
    assert body == {"topic": TOPIC, "epoch": latest["epoch"], "seq": 1, "recovered": True, "events": []}
    # wait=0 (the default) answers at once with the same
    status, _, body = get(relay, f"/topics/{TOPIC}/events?epoch={latest['epoch']}&since=1", auth(relay))
    assert status == 200 and body["events"] == []
    # an unknown topic after its wait: 404
    status, _, body = get(relay, "/topics/nobody/events?wait=1", auth(relay))
    assert status == 404 and body["error"] == "not_found"


def test_wrong_epoch_is_recovered_false(relay):
    relay.emit_lines([{"topic": TOPIC, "progress": p} for p in (1, 2, 3)])
    status, _, body = get(relay, f"/topics/{TOPIC}/events?epoch=not-this-one&since=1&wait=25", auth(relay))
    assert status == 200 and body["recovered"] is False
    assert [e["seq"] for e in body["events"]] == [3]
    # since without epoch: as a subscribe, no resume
    status, _, body = get(relay, f"/topics/{TOPIC}/events?since=1&wait=25", auth(relay))
    assert status == 200 and body["recovered"] is False and [e["seq"] for e in body["events"]] == [3]


def test_since_older_than_history_is_recovered_false(relay_factory):
    relay = relay_factory("--history", "2")
    relay.emit_lines([{"topic": TOPIC, "progress": p} for p in range(1, 6)])
    _, _, latest = get(relay, f"/topics/{TOPIC}", auth(relay))
    status, _, body = get(relay, f"/topics/{TOPIC}/events?epoch={latest['epoch']}&since=1", auth(relay))
    assert status == 200 and body["recovered"] is False and [e["seq"] for e in body["events"]] == [5]
    status, _, body = get(relay, f"/topics/{TOPIC}/events?epoch={latest['epoch']}&since=3", auth(relay))
    assert body["recovered"] is True and [e["seq"] for e in body["events"]] == [4, 5]


def test_waiter_bound_per_sub(relay_factory):
    relay = relay_factory("--max-subscriptions", "2")
    relay.emit_lines([{"topic": TOPIC, "progress": 1}])
    _, _, latest = get(relay, f"/topics/{TOPIC}", auth(relay))
    path = f"/topics/{TOPIC}/events?epoch={latest['epoch']}&since=1&wait=30"
    polls = [Poll(relay, path, auth(relay, sub="alice")) for _ in range(2)]
    for p in polls:
        p.start()
    wait_until(lambda: waiters(relay) == 2, 10, what="two polls to wait")
    status, headers, body = get(relay, path, auth(relay, sub="alice"))
    assert status == 429 and body["error"] == "too_many_subscriptions"
    assert headers["retry-after"] == "1"
    # another sub has its own budget
    other = Poll(relay, path, auth(relay, sub="bob"))
    other.start()
    wait_until(lambda: waiters(relay) == 3, 10, what="bob's poll to wait")
    relay.emit_lines([{"topic": TOPIC, "progress": 2}])
    for p in polls + [other]:
        p.join(20)
        assert p.result[0] == 200 and [e["seq"] for e in p.result[2]["events"]] == [2]
    # a slot freed by a closed connection is free again
    wait_until(lambda: waiters(relay) == 0, 5, what="no waiter left")


def test_closed_connection_frees_its_waiter(relay):
    relay.emit_lines([{"topic": TOPIC, "progress": 1}])
    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=10)
    conn.request("GET", f"/topics/{TOPIC}/events?wait=30&since=1&epoch=x", headers=auth(relay))
    # epoch x: answered at once (recovered false); a real wait:
    conn.getresponse().read()
    _, _, latest = get(relay, f"/topics/{TOPIC}", auth(relay))
    conn.request("GET", f"/topics/{TOPIC}/events?wait=30&since=1&epoch={latest['epoch']}", headers=auth(relay))
    wait_until(lambda: waiters(relay) == 1, 10, what="the poll to wait")
    conn.close()
    wait_until(lambda: waiters(relay) == 0, 10, what="the closed poll's waiter to go")


def test_sigterm_answers_pending_waiters(relay):
    relay.emit_lines([{"topic": TOPIC, "progress": 1}])
    _, _, latest = get(relay, f"/topics/{TOPIC}", auth(relay))
    polls = [Poll(relay, f"/topics/{TOPIC}/events?epoch={latest['epoch']}&since=1&wait=60", auth(relay)),
             Poll(relay, "/topics/not-yet/events?wait=60", auth(relay))]
    for p in polls:
        p.start()
    wait_until(lambda: waiters(relay) == 2, 10, what="the polls to wait")
    relay.send_signal(signal.SIGTERM)
    for p in polls:
        p.join(15)
        assert not p.is_alive(), "a pending long-poll was not answered at shutdown"
    status, _, body = polls[0].result
    assert status == 200 and body["events"] == [] and body["seq"] == 1
    status, _, body = polls[1].result
    assert status == 404
    assert relay.wait(10) == 0


# --------------------------------------------------------------------------------------------
# cluster mode: a relay that does not hold the topic reads it from Redis

def _have_redis():
    try:
        import redislib
        return redislib.have_redis()
    except Exception:  # noqa: BLE001
        return False


@pytest.fixture
def redis_server():
    import redislib
    server = redislib.RedisServer(name="redis").start()
    yield server
    server.cleanup()


@pytest.mark.skipif(not _have_redis(), reason="redis-server is not installed")
def test_cluster_reads_a_topic_it_does_not_hold(redis_server, relay_factory):
    import secrets as _secrets
    secret = _secrets.token_hex(32)
    a = relay_factory("--redis", redis_server.url(), "--node-name", "A", name="relayA", secret=secret)
    b = relay_factory("--redis", redis_server.url(), "--node-name", "B", name="relayB", secret=secret)
    for r in (a, b):
        wait_until(lambda r=r: r.http("/readyz")[0] == 200, 15, what=f"{r.name} ready")
    a.emit_lines([{"topic": TOPIC, "progress": p} for p in (1, 2, 3)])
    # B has no subscriber of the topic: it answers from Redis
    wait_until(lambda: get(b, f"/topics/{TOPIC}", auth(b))[2].get("seq") == 3
               if get(b, f"/topics/{TOPIC}", auth(b))[0] == 200 else False, 10, what="B to see seq 3")
    status, headers, body = get(b, f"/topics/{TOPIC}", auth(b))
    assert status == 200 and body["event"] == {"seq": 3, "topic": TOPIC, "progress": 3}
    # the same epoch on both relays: Redis numbers the topic
    _, _, on_a = get(a, f"/topics/{TOPIC}", auth(a))
    assert on_a["epoch"] == body["epoch"] and headers["etag"] == f'"{body["epoch"]}:3"'
    epoch = body["epoch"]
    status, _, body = get(b, f"/topics/{TOPIC}/events?epoch={epoch}&since=1", auth(b))
    assert status == 200 and body["recovered"] is True and [e["seq"] for e in body["events"]] == [2, 3]
    status, _, body = get(b, "/topics/nobody/events", auth(b))
    assert status == 404
    # a long-poll on B, answered by an event emitted on A
    poll = Poll(b, f"/topics/{TOPIC}/events?epoch={epoch}&since=3&wait=30", auth(b))
    poll.start()
    wait_until(lambda: waiters(b) == 1, 10, what="B's poll to wait")
    emitted_at = time.monotonic()
    a.emit_lines([{"topic": TOPIC, "progress": 4}])
    poll.join(20)
    status, _, body = poll.result
    assert poll.answered_at >= emitted_at
    assert status == 200 and body["recovered"] is True and [e["seq"] for e in body["events"]] == [4]
