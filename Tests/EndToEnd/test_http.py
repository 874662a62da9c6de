"""Contract section 6: HTTP routes."""

from __future__ import annotations

import json
import re

import pytest

from relaylib import (
    async_test, async_wait_until, expect_close, recv_events, recv_json, settle, topic_count,
    ws_connect,
)

SECRET_TOPIC = "secret-topic-9f3a"
SECRET_SUB = "secret-sub-77c1"

SAMPLE = re.compile(
    r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+"
    r"([-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?|NaN|[-+]Inf)(\s+-?\d+)?$")


def parse_prometheus(text: str) -> list[tuple[str, str, float]]:
    out = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        m = SAMPLE.match(line.strip())
        assert m, f"not a Prometheus sample line: {line!r}"
        out.append((m.group(1), m.group(2) or "", float(m.group(3))))
    return out


async def make_traffic(relay):
    """Connections, subscriptions, events, a rejected line and an auth failure, all naming
    SECRET_TOPIC and SECRET_SUB."""
    tok = relay.token(sub=SECRET_SUB, topics=[SECRET_TOPIC])
    ws = await ws_connect(relay, token=tok, topics=[SECRET_TOPIC])
    assert (await recv_json(ws))["op"] == "subscribed"
    answers = await relay.aemit([
        {"topic": SECRET_TOPIC, "type": "progress", "progress": 5},
        f'{{"topic":"{SECRET_TOPIC}","seq":3}}',
        "not json " + SECRET_TOPIC,
    ])
    assert [a["line"] for a in answers] == [2, 3]
    await recv_events(ws, 1)
    bad = await ws_connect(relay, token=relay.token(sub=SECRET_SUB, secret="nope"))
    await expect_close(bad)
    return ws, tok


def test_healthz(relay):
    status, body = relay.http("/healthz")
    assert status == 200
    assert body.strip() == "ok"


@pytest.mark.parametrize("path", ["/nope", "/healthz/extra", "/metricsx", "/ws/x"])
def test_unknown_path_is_404(relay, path):
    status, _ = relay.http(path)
    assert status == 404


@async_test
async def test_metrics_is_prometheus_text_with_prefixed_names(relay):
    ws, _ = await make_traffic(relay)
    status, headers, body = relay.http_full("/metrics")
    assert status == 200
    assert headers.get("content-type", "").startswith("text/plain"), headers
    samples = parse_prometheus(body)
    assert samples, "no samples"
    names = {n for n, _, _ in samples}
    bad = sorted(n for n in names if not n.startswith("progress_relay_"))
    assert not bad, f"metric names without the progress_relay_ prefix: {bad}"
    # a histogram of the delay from reading a line to writing its frames
    assert any(n.endswith("_bucket") for n in names), "no histogram"
    assert re.search(r"^# TYPE progress_relay_\S+ histogram$", body, re.M), "no histogram TYPE"
    # the families the contract lists (names are not promised: match on words)
    for word in ["connection", "subscription", "topic", "receiv", "reject", "deliver",
                 "slow", "auth"]:
        assert any(word in n for n in names), f"no metric about {word!r}: {sorted(names)}"
    await ws.close()


@async_test
async def test_metrics_and_stats_name_no_topic_user_or_token(relay):
    ws, tok = await make_traffic(relay)
    _, metrics = relay.http("/metrics")
    _, stats = relay.http("/stats")
    for text, what in ((metrics, "/metrics"), (stats, "/stats")):
        assert SECRET_TOPIC not in text, f"{what} names a topic"
        assert SECRET_SUB not in text, f"{what} names a user"
        assert tok.split(".")[2] not in text and tok.split(".")[1] not in text, \
            f"{what} holds a token"
    await ws.close()


def _reject_total(body: str) -> float:
    return sum(v for n, _, v in parse_prometheus(body)
               if "reject" in n and not n.endswith(("_bucket", "_sum", "_count", "_created")))


@async_test
async def test_metrics_count_rejected_lines(relay):
    before = _reject_total(relay.metrics())
    answers = await relay.aemit(["nope", '{"topic":"t","op":"x"}', '{"topic":"t"}'])
    assert len(answers) == 2
    after = _reject_total(relay.metrics())
    assert after - before == 2, (before, after)


@async_test
async def test_stats_is_a_json_object_of_counts(relay):
    ws, _ = await make_traffic(relay)
    status, headers, body = relay.http_full("/stats")
    assert status == 200
    stats = json.loads(body)
    assert isinstance(stats, dict) and stats

    def check(obj, path="stats"):
        for k, v in obj.items():
            if isinstance(v, dict):
                check(v, f"{path}.{k}")
            else:
                assert isinstance(v, (int, float)) and not isinstance(v, bool), \
                    f"{path}.{k} = {v!r} is not a number"

    check(stats)
    await ws.close()


@async_test
async def test_stats_topic_count_follows_topics(relay):
    assert topic_count(relay) == 0
    assert await relay.aemit([{"topic": f"s{k}"} for k in range(3)]) == []
    await settle(relay, "s2", 1)
    assert topic_count(relay) == 3


def metric_sum(body: str, word: str) -> float:
    """Sum of the samples whose name contains `word` (histogram series left out)."""
    return sum(v for n, _, v in parse_prometheus(body)
               if word in n and not n.endswith(("_bucket", "_sum", "_count", "_created")))


def histogram_count(body: str) -> float:
    hist = set(re.findall(r"^# TYPE (\S+) histogram$", body, re.M))
    return sum(v for n, _, v in parse_prometheus(body) if n.endswith("_count")
               and n[:-len("_count")] in hist)


@async_test
async def test_metrics_move_with_traffic(relay):
    before = relay.metrics()
    ws = await ws_connect(relay, topics=["mt"])
    await recv_json(ws)
    # gauges may be sampled (about once a second): wait for them
    subs0 = metric_sum(before, "subscription")
    await async_wait_until(
        lambda: metric_sum(relay.metrics(), "subscription") >= subs0 + 1,
        3, what="the subscriptions gauge to count the subscription")
    await async_wait_until(
        lambda: metric_sum(relay.metrics(), "connection") >= metric_sum(before, "connection") + 1,
        3, what="the connections gauge to count the connection")
    assert await relay.aemit([{"topic": "mt", "i": i} for i in range(3)]) == []
    await recv_events(ws, 3)
    bad = await ws_connect(relay, token=relay.token(secret="wrong"))
    await expect_close(bad)
    after = relay.metrics()
    assert metric_sum(after, "receiv") >= metric_sum(before, "receiv") + 3, "events received"
    assert metric_sum(after, "deliver") >= metric_sum(before, "deliver") + 3, "deliveries"
    assert metric_sum(after, "auth") >= metric_sum(before, "auth") + 1, "auth-failure closes"
    await async_wait_until(lambda: metric_sum(relay.metrics(), "topic") >= 1, 3,
                           what="the topics gauge to count the topic")
    assert histogram_count(after) >= histogram_count(before) + 1, "delay histogram"
    await ws.close()


MALFORMED_QUERY = {"error": "bad_request", "message": "malformed percent-escape in the query"}


@pytest.mark.parametrize("path", [
    "/ws?topic=%zz", "/ws?topic=task%4", "/ws?token=abc%", "/ws?topic=%FF",
    "/sse?topic=task%3A1&since=1%", "/sse?topic=%C3", "/sse?%zz=1",
    "/topics/task%3A1?token=%zz", "/topics/task%3A1/events?since=%4",
])
def test_a_malformed_percent_escape_in_the_query_is_400(relay, path):
    """A `%` without two hex digits, or escapes that are not UTF-8, are refused, not dropped:
    otherwise `?topic=a%zzb` would be a topic the client never named."""
    token = relay.token(topics=["*"])
    status, headers, body = relay.http_full(path, headers={"Authorization": f"Bearer {token}"})
    assert status == 400, (path, status, body)
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == MALFORMED_QUERY


def test_a_malformed_percent_escape_is_not_upgraded(relay):
    """The WebSocket handshake itself is refused with the same 400, not answered with 101."""
    handshake = {
        "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    }
    status, _, body = relay.http_full(
        "/ws?topic=task%3A1&token=" + relay.token(topics=["*"]) + "&x=%g1", headers=handshake)
    assert status == 400
    assert json.loads(body) == MALFORMED_QUERY
    # the same URL well-formed is upgraded
    status, _, _ = relay.http_full(
        "/ws?topic=task%3A1&token=" + relay.token(topics=["*"]) + "&x=%41", headers=handshake)
    assert status == 101
