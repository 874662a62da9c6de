"""Issue 14: keep the token out of URLs.

Three ways to hand the relay a token, best first: the subprotocol `bearer.<JWT>` beside
`progress-relay.v1`; a one-time ticket (`POST /ticket`, then `GET /ws?ticket=`); `?token=`.
The last test puts Debian's nginx, configured as the README says, in front of a relay and
searches every log for the tokens."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import re
import time

import pytest

import nginxlib
import relaylib
from relaylib import (
    RawWS, async_test, expect_close, ping_pong, recv_events, recv_json, send_json, ws_connect,
)
from test_auth import BAD_TOKENS, assert_unauthorized_close

V1 = "progress-relay.v1"


def post_ticket(port: int, token: str | None, *, origin: str | None = None,
                conn: http.client.HTTPConnection | None = None, method: str = "POST"):
    """POST /ticket; returns (status, headers, parsed JSON body or None)."""
    own = conn is None
    if own:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if origin is not None:
        headers["Origin"] = origin
    try:
        conn.request(method, "/ticket", headers=headers)
        resp = conn.getresponse()
        body = resp.read().decode()
        hdrs = {k.lower(): v for k, v in resp.getheaders()}
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = body
        return resp.status, hdrs, parsed
    finally:
        if own:
            conn.close()


def ticket_for(relay, token=None, origin=None) -> str:
    status, _, body = post_ticket(relay.port, token or relay.token(topics=["*"]), origin=origin)
    assert status == 200, (status, body)
    return body["ticket"]


async def first_frame_ok(ws, topic="job:1"):
    await send_json(ws, {"op": "subscribe", "topic": topic})
    frame = await recv_json(ws)
    assert frame.get("op") == "subscribed" and frame.get("topic") == topic, frame


# ---------------------------------------------------------------------------------------------
# the subprotocol

@async_test
async def test_subprotocol_token_accepted_and_only_v1_selected(relay):
    ws = await ws_connect(relay, token=relay.token(topics=["job:*"]), via="subprotocol", topics=["job:1"])
    assert ws.subprotocol == V1
    frame = await recv_json(ws)
    assert frame["op"] == "subscribed" and frame["topic"] == "job:1", frame
    relay.emit_lines([{"topic": "job:1", "type": "progress", "progress": 5}])
    [event] = await recv_events(ws, 1)
    assert event["seq"] == 1 and event["progress"] == 5
    # the grants are the token's
    await send_json(ws, {"op": "subscribe", "topic": "other"})
    assert (await recv_json(ws))["code"] == "forbidden"


def test_subprotocol_answer_names_exactly_v1(relay):
    token = relay.token(topics=["*"])
    for value in (f"{V1}, bearer.{token}", f"bearer.{token}, {V1}", f"chat, bearer.{token},{V1}"):
        ws = RawWS(relay, "/ws?topic=t", headers={"Sec-WebSocket-Protocol": value})
        assert ws.status == 101, (value, ws.status)
        assert ws.headers.get("sec-websocket-protocol") == V1, ws.headers
        assert token not in json.dumps(ws.headers)
        assert ws.recv_json()["op"] == "subscribed"
        ws.close()
    # the names may come on separate header lines too
    raw = RawWS(relay, "/ws", do_handshake=False)
    status, headers = _handshake_with_lines(raw, [f"Sec-WebSocket-Protocol: {V1}",
                                                  f"Sec-WebSocket-Protocol: bearer.{token}"])
    assert status == 101 and headers.get("sec-websocket-protocol") == V1, headers
    raw.send_json({"op": "subscribe", "topic": "a"})
    assert raw.recv_json()["op"] == "subscribed"
    raw.close()


def _handshake_with_lines(raw: RawWS, lines: list[str]):
    key = base64.b64encode(os.urandom(16)).decode()
    request = [f"GET {raw.path} HTTP/1.1", f"Host: 127.0.0.1:{raw.port}", "Upgrade: websocket",
               "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13", *lines]
    raw.sock.sendall(("\r\n".join(request) + "\r\n\r\n").encode())
    while b"\r\n\r\n" not in raw.buf:
        b = raw.sock.recv(65536)
        assert b, raw.buf
        raw.buf += b
    head, raw.buf = raw.buf.split(b"\r\n\r\n", 1)
    head_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for l in head_lines[1:]:
        k, _, v = l.partition(":")
        headers[k.strip().lower()] = v.strip()
    return int(head_lines[0].split()[1]), headers


def test_v1_alone_is_selected_and_the_query_token_still_works(relay):
    ws = RawWS.for_relay(relay, topics=["a"], headers={"Sec-WebSocket-Protocol": V1})
    assert ws.status == 101 and ws.headers.get("sec-websocket-protocol") == V1
    assert ws.recv_json()["op"] == "subscribed"
    ws.close()
    # no subprotocol offered: none selected, as before
    ws = RawWS.for_relay(relay, topics=["a"])
    assert ws.status == 101 and "sec-websocket-protocol" not in ws.headers
    ws.close()


@pytest.mark.parametrize("value", ["bearer.{t}", "bearer.{t}, chat", "bearer.{t}, bearer.{t}, " + V1,
                                   "bearer.{t}, progress-relay.V1"],
                         ids=["bearer-alone", "bearer-and-another", "two-bearers", "wrong-case-v1"])
def test_bearer_without_v1_is_refused(relay, value):
    token = relay.token(topics=["*"])
    ws = RawWS(relay, "/ws?topic=a", headers={"Sec-WebSocket-Protocol": value.format(t=token)})
    assert ws.status == 400, ws.status
    assert "sec-websocket-protocol" not in ws.headers
    ws.close()


BEARER_BAD = ["missing-ish", "garbage", "bad-signature", "expired-long-ago", "alg-none-unsigned",
              "tampered-payload", "not-yet-valid"]


@pytest.mark.parametrize("name", BEARER_BAD)
@async_test
async def test_bad_subprotocol_token_gets_4401(relay, name):
    token = "x" if name == "missing-ish" else BAD_TOKENS[name](relay)
    ws = await ws_connect(relay, token=token, via="subprotocol", topics=["t"])
    assert ws.subprotocol == V1
    await assert_unauthorized_close(ws)


@async_test
async def test_subprotocol_token_wins_over_query_token(relay):
    """The subprotocol's token is the one used: a good one there and a bad one in the URL connect."""
    good = relay.token(topics=["*"])
    ws = await ws_connect(relay, token=good, via="subprotocol",
                          extra_query=[("token", relay.token(topics=["*"], secret="other"))])
    await first_frame_ok(ws)


# ---------------------------------------------------------------------------------------------
# tickets

@async_test
async def test_ticket_post_and_use(relay):
    token = relay.token(topics=["job:*"])
    status, headers, body = post_ticket(relay.port, token)
    assert status == 200, body
    assert headers["cache-control"] == "no-store"
    assert headers["content-type"].startswith("application/json")
    assert set(body) == {"ticket", "expires_in"} and body["expires_in"] == 30
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", body["ticket"]), body
    assert base64.urlsafe_b64decode(body["ticket"] + "==").__len__() == 16
    ws = await ws_connect(relay, token=None, topics=["job:1"], extra_query=[("ticket", body["ticket"])])
    frame = await recv_json(ws)
    assert frame["op"] == "subscribed", frame
    relay.emit_lines([{"topic": "job:1", "type": "progress", "progress": 1}])
    assert (await recv_events(ws, 1))[0]["progress"] == 1
    # the token's grants came along
    await send_json(ws, {"op": "subscribe", "topic": "nope"})
    assert (await recv_json(ws))["code"] == "forbidden"
    # tickets differ
    assert len({ticket_for(relay, token) for _ in range(20)}) == 20


@pytest.mark.parametrize("name", ["missing", "garbage", "bad-signature", "expired-long-ago", "alg-none-unsigned"])
def test_ticket_refused_for_a_bad_token(relay, name):
    token = BAD_TOKENS[name](relay)
    status, headers, body = post_ticket(relay.port, token)
    assert status == 401, (status, body)
    assert body["error"] == "unauthorized" and body["message"], body
    assert "ticket" not in body
    assert headers["cache-control"] == "no-store"


def test_ticket_route_methods(relay):
    status, headers, _ = post_ticket(relay.port, relay.token(topics=["*"]), method="GET")
    assert status == 405 and "POST" in headers.get("allow", "")
    # a browser's preflight
    status, headers, _ = post_ticket(relay.port, None, origin="https://app.example.com", method="OPTIONS")
    assert status == 204
    assert headers["access-control-allow-origin"] == "https://app.example.com"
    assert "Authorization" in headers["access-control-allow-headers"]
    status, headers, _ = post_ticket(relay.port, relay.token(topics=["*"]), origin="https://app.example.com")
    assert status == 200 and headers["access-control-allow-origin"] == "https://app.example.com"


def test_ticket_post_from_a_refused_origin(relay_factory):
    relay = relay_factory("--allow-origin", "https://app.example.com")
    status, _, body = post_ticket(relay.port, relay.token(topics=["*"]), origin="https://evil.example")
    assert status == 403 and "ticket" not in (body or {}), body
    status, _, body = post_ticket(relay.port, relay.token(topics=["*"]), origin="https://app.example.com")
    assert status == 200, body


@async_test
async def test_ticket_is_single_use(relay):
    ticket = ticket_for(relay)
    ws = await ws_connect(relay, token=None, extra_query=[("ticket", ticket)])
    await first_frame_ok(ws)
    again = await ws_connect(relay, token=None, extra_query=[("ticket", ticket)])
    await assert_unauthorized_close(again)
    # an unknown ticket too
    other = await ws_connect(relay, token=None, extra_query=[("ticket", "A" * 22)])
    await assert_unauthorized_close(other)


@async_test
async def test_ticket_is_used_by_a_handshake_that_fails(relay_factory):
    relay = relay_factory("--allow-origin", "https://app.example.com")
    # refused origin: 403, and the ticket is gone
    ticket = ticket_for(relay)
    ws = RawWS(relay, f"/ws?ticket={ticket}", headers={"Origin": "https://evil.example"})
    assert ws.status == 403
    ws.close()
    again = await ws_connect(relay, token=None, extra_query=[("ticket", ticket)])
    await assert_unauthorized_close(again)
    # a malformed subprotocol offer: 400, gone
    ticket = ticket_for(relay)
    ws = RawWS(relay, f"/ws?ticket={ticket}", headers={"Sec-WebSocket-Protocol": "bearer.x"})
    assert ws.status == 400
    ws.close()
    again = await ws_connect(relay, token=None, extra_query=[("ticket", ticket)])
    await assert_unauthorized_close(again)
    # a plain GET, no upgrade at all: 426, gone
    ticket = ticket_for(relay)
    status, _ = relay.http(f"/ws?ticket={ticket}")
    assert status == 426
    again = await ws_connect(relay, token=None, extra_query=[("ticket", ticket)])
    await assert_unauthorized_close(again)
    # a handshake bound to another origin: 4401, gone
    ticket = ticket_for(relay, origin="https://app.example.com")
    ws = await ws_connect(relay, token=None, extra_query=[("ticket", ticket)])
    await assert_unauthorized_close(ws)
    again = await ws_connect(relay, token=None, extra_query=[("ticket", ticket)], origin="https://app.example.com")
    await assert_unauthorized_close(again)


@async_test(timeout=90)
async def test_ticket_expires_after_30_seconds(relay):
    early, late = ticket_for(relay), ticket_for(relay)
    await asyncio.sleep(28)
    ws = await ws_connect(relay, token=None, extra_query=[("ticket", early)])
    await first_frame_ok(ws)
    await asyncio.sleep(3.5)
    ws2 = await ws_connect(relay, token=None, extra_query=[("ticket", late)])
    frames, code = await expect_close(ws2)
    assert code == 4401 and "expired" in frames[0]["message"], frames


@async_test
async def test_ticket_origin_binding(relay):
    origin = "https://app.example.com"
    ws = await ws_connect(relay, token=None, origin=origin,
                          extra_query=[("ticket", ticket_for(relay, origin=origin))])
    await first_frame_ok(ws)
    # the same origin as a browser sends it, written otherwise when asked for
    ws = await ws_connect(relay, token=None, origin=origin,
                          extra_query=[("ticket", ticket_for(relay, origin="https://APP.example.com:443"))])
    await first_frame_ok(ws)
    for presented in ("https://evil.example", "http://app.example.com", None):
        ws = await ws_connect(relay, token=None, origin=presented,
                              extra_query=[("ticket", ticket_for(relay, origin=origin))])
        frames, code = await expect_close(ws)
        assert code == 4401 and frames[0]["code"] == "unauthorized", (presented, frames)
    # a ticket asked for without Origin works from anywhere
    ws = await ws_connect(relay, token=None, origin="https://elsewhere.example",
                          extra_query=[("ticket", ticket_for(relay))])
    await first_frame_ok(ws)


@async_test(timeout=120)
async def test_at_most_10000_tickets_the_oldest_dropped(relay):
    token = relay.token(topics=["*"])
    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=10)
    tickets = []
    try:
        for _ in range(10_001):
            status, _, body = post_ticket(relay.port, token, conn=conn)
            assert status == 200, body
            tickets.append(body["ticket"])
    finally:
        conn.close()
    first = await ws_connect(relay, token=None, extra_query=[("ticket", tickets[0])])
    await assert_unauthorized_close(first)
    for t in (tickets[1], tickets[5000], tickets[-1]):
        ws = await ws_connect(relay, token=None, extra_query=[("ticket", t)])
        await first_frame_ok(ws)
        await ws.close()


@async_test(timeout=30)
async def test_refresh_and_expiry_on_a_ticket_connection(relay):
    """The connection has the token's exp: it ends at exp unless refreshed, as with ?token=."""
    ws = await ws_connect(relay, token=None, topics=["job:1"],
                          extra_query=[("ticket", ticket_for(relay, relay.token(topics=["job:*"], exp_in=3)))])
    assert (await recv_json(ws))["op"] == "subscribed"
    fresh = relay.token(topics=["job:*"], exp_in=600)
    await send_json(ws, {"op": "refresh", "token": fresh})
    answer = await recv_json(ws)
    assert answer == {"op": "refreshed", "exp": relaylib.decode_jwt(fresh)[1]["exp"]}, answer
    await asyncio.sleep(4.5)
    await ping_pong(ws)
    relay.emit_lines([{"topic": "job:1", "type": "progress", "progress": 9}])
    assert (await recv_events(ws, 1))[0]["progress"] == 9
    # without a refresh: closed at exp
    ws2 = await ws_connect(relay, token=None,
                           extra_query=[("ticket", ticket_for(relay, relay.token(topics=["*"], exp_in=2)))])
    await first_frame_ok(ws2)
    frames, code = await expect_close(ws2, timeout=5)
    assert code == 4401, (frames, code)
    # a refresh naming another sub is refused, as always
    ws3 = await ws_connect(relay, token=None, extra_query=[("ticket", ticket_for(relay))])
    await send_json(ws3, {"op": "refresh", "token": relay.token(sub="someone-else", topics=["*"])})
    await assert_unauthorized_close(ws3)


# ---------------------------------------------------------------------------------------------
# nginx in front, configured as the README says: which logs hold the token

def readme_nginx_block() -> str:
    text = (relaylib.REPO / "README.md").read_text()
    blocks = re.findall(r"```nginx\n(.*?)```", text, re.S)
    assert len(blocks) == 1, "the README should hold one nginx configuration"
    return blocks[0]


class Nginx(nginxlib.Nginx):
    """nginx (nginxlib) with the README's block, its access log in the temporary directory and a
    `combined` one beside it."""

    def __init__(self, relay_port: int):
        super().__init__()
        self.access_log = self.dir / "access.log"
        self.combined_log = self.dir / "combined.log"
        block = readme_nginx_block()
        readme_log = "/var/log/nginx/progress-relay.access.log"
        assert "listen 80;" in block and "127.0.0.1:8765" in block and readme_log in block
        block = block.replace("listen 80;", f"listen 127.0.0.1:{self.port};")
        block = block.replace("127.0.0.1:8765", f"127.0.0.1:{relay_port}")
        # The README's log, and beside it what nginx's default format would have written.
        block = block.replace(readme_log + " progress_relay;",
                              f"{self.access_log} progress_relay;\n    access_log {self.combined_log} combined;")
        self.configure(block)

    def logs(self) -> dict[str, str]:
        return self.read_logs(self.access_log, self.combined_log, self.error_log)


def secrets_of(token: str) -> list[str]:
    """The token, and its payload part (what a log that cut the token short could still hold)."""
    return [token, token.split(".")[1]]


def hits(text: str, tokens: list[str]) -> int:
    return sum(text.count(s) for t in tokens for s in secrets_of(t))


WAYS = ("subprotocol", "ticket", "query")


@pytest.mark.skipif(not nginxlib.have_nginx(), reason=nginxlib.SKIP_REASON)
@async_test(timeout=240)
async def test_nginx_in_front_no_token_in_the_logs(relay_factory):
    """100 connections each way through nginx with the README's configuration; then the nginx
    logs (the README's access log, a `combined` one beside it, the error log at `info`) and the
    relay's `--log-level trace` log are searched for each token and its payload part."""
    relay = relay_factory("--log-level", "trace")
    nginx = Nginx(relay.port)
    tokens: dict[str, list[str]] = {way: [] for way in WAYS}
    marks: dict[str, dict[str, int]] = {}
    try:
        nginx.start()
        proxied = nginxlib.Through(relay, nginx.port)
        n = 100
        for way in WAYS:
            for i in range(n):
                token = relay.token(sub=f"{way}-{i}", topics=["job:*"])
                tokens[way].append(token)
                if way == "subprotocol":
                    ws = await ws_connect(proxied, token=token, via="subprotocol", topics=["job:1"])
                    assert ws.subprotocol == V1
                elif way == "ticket":
                    status, _, body = post_ticket(nginx.port, token)
                    assert status == 200, body
                    ws = await ws_connect(proxied, token=None, topics=["job:1"],
                                          extra_query=[("ticket", body["ticket"])])
                else:
                    ws = await ws_connect(proxied, token=token, topics=["job:1"])
                frame = await recv_json(ws)
                assert frame["op"] == "subscribed", (way, i, frame)
                await ws.close()
            time.sleep(0.5)  # nginx writes the line when the proxied connection ends
            marks[way] = {name: len(text) for name, text in nginx.logs().items()}
        nginx.stop()
        texts = nginx.logs()
    finally:
        nginx.cleanup()
    relay_log = relay.log_text()
    assert "--log-level trace" in " ".join(relay.command)

    # each way's part of each log
    part: dict[str, dict[str, str]] = {}
    start = {name: 0 for name in texts}
    for way in WAYS:
        end = {name: (len(texts[name]) if way == WAYS[-1] else marks[way][name]) for name in texts}
        part[way] = {name: texts[name][start[name]:end[name]] for name in texts}
        start = end
    every = [t for way in WAYS for t in tokens[way]]

    # the relay never logs a token, whichever way it came
    assert hits(relay_log, every) == 0
    for way in WAYS:
        logged = part[way]
        # the README's access log: a line per request, and no token, whichever way
        assert logged["access.log"].count("GET /ws ") >= n, (way, logged["access.log"][-2000:])
        assert hits(logged["access.log"], tokens[way]) == 0, way
        assert "?" not in logged["access.log"], way
    for way in ("subprotocol", "ticket"):
        # no URL holds the token: even the default format and the error log have none
        assert hits(part[way]["combined.log"], tokens[way]) == 0, way
        assert hits(part[way]["error.log"], tokens[way]) == 0, way
    assert part["ticket"]["access.log"].count("POST /ticket ") == n
    # what the README's format is for: the default one writes ?token= (and the search finds it)
    assert hits(part["query"]["combined.log"], tokens["query"]) >= n
