"""What browsers of other origins need from the relay (issue 16): the client module importable
across origins (CORS on /progress-relay.js), and the relay's --ping-interval told to clients in
the first `subscribed` frame of a connection (`ping_interval`, seconds)."""

from __future__ import annotations

from relaylib import REPO, async_test, expect_nothing, recv_json, subscribe, ws_connect


def test_client_module_is_served_to_any_origin(relay):
    status, headers, body = relay.http_full(
        "/progress-relay.js", headers={"Origin": "https://app.example.com"})
    assert status == 200
    assert headers.get("access-control-allow-origin") == "*", headers
    # a public file: no credentials are ever allowed with it
    assert "access-control-allow-credentials" not in headers, headers
    assert headers["content-type"].startswith("text/javascript"), headers
    assert body == (REPO / "clients" / "js" / "progress-relay.js").read_text()
    status, headers, _ = relay.http_full("/progress-relay.js", method="HEAD")
    assert status == 200 and headers.get("access-control-allow-origin") == "*", headers


def test_only_the_client_module_gets_the_wildcard(relay):
    for path in ("/", "/stats", "/metrics", "/healthz"):
        _, headers, _ = relay.http_full(path, headers={"Origin": "https://app.example.com"})
        assert "access-control-allow-origin" not in headers, (path, headers)


@async_test
async def test_first_subscribed_frame_tells_the_ping_interval(relay_factory):
    relay = relay_factory("--ping-interval", "0.5")
    ws = await ws_connect(relay, topics=["a"])
    first = await recv_json(ws)
    assert first == {"op": "subscribed", "topic": "a", "epoch": first["epoch"], "seq": 0,
                     "recovered": False, "ping_interval": 0.5}, first
    # later answers on the connection do not repeat it
    second = await subscribe(ws, "b:*")
    assert second == {"op": "subscribed", "topic": "b:*", "seq": 0, "recovered": False}, second
    third = await subscribe(ws, "c")
    assert "ping_interval" not in third, third
    await expect_nothing(ws, 0.2)
    await ws.close()

    # whole seconds are a JSON integer; every connection is told once
    relay2 = relay_factory("--ping-interval", "40")
    for _ in range(2):
        ws = await ws_connect(relay2)
        f = await subscribe(ws, "x")
        assert f["ping_interval"] == 40 and isinstance(f["ping_interval"], int), f
        await ws.close()
