"""Contract section 5: tokens, grants, expiry, refresh, origins."""

from __future__ import annotations

import asyncio
import time

import pytest

from relaylib import (
    InvalidStatus, async_test, b64url, decode_jwt, expect_close, mint_jwt, ping_pong,
    recv_events, recv_json, send_json, ws_connect,
)


async def assert_unauthorized_close(ws, timeout: float = 5):
    frames, code = await expect_close(ws, timeout)
    assert frames, "no error frame before the close"
    f = frames[0]
    assert f.get("op") == "error" and f.get("code") == "unauthorized", frames
    assert isinstance(f.get("message"), str) and f["message"], f
    assert len(frames) == 1, f"frames besides the error: {frames}"
    assert code == 4401, f"close code {code}, expected 4401"


def _tampered(relay) -> str:
    tok = relay.token(topics=["a"])
    h, _, s = tok.split(".")
    p = b64url(b'{"sub":"u1","topics":["*"],"exp":%d}' % (int(time.time()) + 3600))
    return f"{h}.{p}.{s}"


BAD_TOKENS = {
    "missing": lambda r: None,
    "empty": lambda r: "",
    "garbage": lambda r: "not-a-token",
    "three-garbage-parts": lambda r: "a.b.c",
    "two-parts": lambda r: ".".join(r.token(topics=["*"]).split(".")[:2]),
    "payload-not-json": lambda r: mint_jwt(r.secret, {}, "HS256").split(".")[0] + "."
    + b64url(b"not json") + "." + b64url(b"x" * 32),
    "bad-signature": lambda r: r.token(topics=["*"], secret="some other secret"),
    "signed-with-trailing-newline": lambda r: r.token(topics=["*"], secret=r.secret + "\n"),
    "tampered-payload": _tampered,
    "alg-none-unsigned": lambda r: r.token(topics=["*"], alg="none", sign_alg="none"),
    "alg-None-unsigned": lambda r: r.token(topics=["*"], alg="None", sign_alg="none"),
    "alg-none-with-hmac-signature": lambda r: r.token(topics=["*"], alg="none", sign_alg="HS256"),
    "alg-RS256-with-hmac-signature": lambda r: r.token(topics=["*"], alg="RS256",
                                                       sign_alg="HS256"),
    "alg-ES256-with-hmac-signature": lambda r: r.token(topics=["*"], alg="ES256",
                                                       sign_alg="HS256"),
    "alg-EdDSA-with-hmac-signature": lambda r: r.token(topics=["*"], alg="EdDSA",
                                                       sign_alg="HS256"),
    "header-HS384-signed-HS256": lambda r: r.token(topics=["*"], alg="HS384", sign_alg="HS256"),
    "expired-long-ago": lambda r: r.token(topics=["*"], exp_in=-3600),
    "expired-2s-ago-no-leeway": lambda r: r.token(topics=["*"], exp_in=-2),
    "not-yet-valid": lambda r: r.token(topics=["*"], nbf_in=3600),
    "not-yet-valid-3s-no-leeway": lambda r: r.token(topics=["*"], nbf_in=3),
}


@pytest.mark.parametrize("make", list(BAD_TOKENS.values()), ids=list(BAD_TOKENS))
@async_test
async def test_bad_token_completes_handshake_then_4401(relay, make):
    tok = make(relay)
    ws = await ws_connect(relay, token=tok, topics=["t"])   # the handshake itself succeeds
    await assert_unauthorized_close(ws)


@pytest.mark.parametrize("make", [BAD_TOKENS["bad-signature"], BAD_TOKENS["expired-long-ago"],
                                  BAD_TOKENS["alg-none-unsigned"]],
                         ids=["bad-signature", "expired", "alg-none"])
@async_test
async def test_bad_bearer_token_gets_4401(relay, make):
    ws = await ws_connect(relay, token=make(relay), bearer=True)
    await assert_unauthorized_close(ws)


@async_test
async def test_non_bearer_authorization_header_is_no_token(relay):
    ws = await ws_connect(relay, token=None,
                          headers={"Authorization": "Basic " + b64url(b"user:pass")})
    await assert_unauthorized_close(ws)


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
@async_test
async def test_hmac_algorithms_are_accepted(relay, alg):
    ws = await ws_connect(relay, token=relay.token(topics=["t"], alg=alg), topics=["t"])
    f = await recv_json(ws)
    assert f["op"] == "subscribed" and f["topic"] == "t", f
    await ping_pong(ws)


@async_test
async def test_token_via_bearer_header(relay):
    ws = await ws_connect(relay, token=relay.token(topics=["t"]), bearer=True, topics=["t"])
    assert (await recv_json(ws))["op"] == "subscribed"
    assert await relay.aemit([b'{"topic":"t","n":1}']) == []
    assert await recv_events(ws, 1) == [{"seq": 1, "topic": "t", "n": 1}]


# ---------------------------------------------------------------------------------------------
# grants

async def _sub_result(ws, topic) -> dict:
    await send_json(ws, {"op": "subscribe", "topic": topic})
    return await recv_json(ws)


@pytest.mark.parametrize("topics, allowed, refused", [
    (["task:1"], ["task:1"], ["task:10", "task:1*", "task:*", "task:", "*", "other"]),
    (["task:*"], ["task:*", "task:1", "task:1*", "task:abc:def", "task:"],
     ["task", "tas*", "task*", "*", "other:1"]),
    (["*"], ["anything", "a:*", "*"], []),
    (["a", "b:*"], ["a", "b:x", "b:*"], ["c", "a:1", "a*"]),
    ([], [], ["a", "*"]),
])
@async_test
async def test_grants_from_topics_claim(relay, topics, allowed, refused):
    ws = await ws_connect(relay, token=relay.token(topics=topics))
    for t in allowed:
        f = await _sub_result(ws, t)
        assert f.get("op") == "subscribed" and f.get("topic") == t, (t, f)
    for t in refused:
        f = await _sub_result(ws, t)
        assert f.get("op") == "error" and f.get("code") == "forbidden", (t, f)
        assert f.get("topic") == t, f
    await ping_pong(ws)   # the connection stays


@async_test
async def test_forbidden_subscribe_delivers_nothing_and_connection_stays(relay):
    ws = await ws_connect(relay, token=relay.token(topics=["mine"]), topics=["mine"])
    await recv_json(ws)
    f = await _sub_result(ws, "theirs")
    assert (f["op"], f["code"], f["topic"]) == ("error", "forbidden", "theirs")
    assert await relay.aemit([b'{"topic":"theirs","n":1}', b'{"topic":"mine","n":2}']) == []
    assert await recv_events(ws, 1) == [{"seq": 1, "topic": "mine", "n": 2}]


@async_test
async def test_grant_template_with_sub(relay_factory):
    relay = relay_factory("--grant", "user:{sub}:*")
    ws = await ws_connect(relay, token=relay.token(sub="alice"))
    for t in ["user:alice:1", "user:alice:*"]:
        f = await _sub_result(ws, t)
        assert f.get("op") == "subscribed", (t, f)
    for t in ["user:bob:1", "user:*", "user:alice", "user:alicex:1"]:
        f = await _sub_result(ws, t)
        assert f.get("op") == "error" and f.get("code") == "forbidden", (t, f)


@async_test
async def test_grants_are_claim_plus_templates(relay_factory):
    relay = relay_factory("--grant", "public:*", "--grant", "user:{sub}:*")
    ws = await ws_connect(relay, token=relay.token(sub="bob", topics=["task:7"]))
    for t in ["public:news", "user:bob:x", "task:7"]:
        assert (await _sub_result(ws, t)).get("op") == "subscribed", t
    for t in ["task:8", "user:alice:x"]:
        assert (await _sub_result(ws, t)).get("code") == "forbidden", t


@async_test
async def test_url_topic_not_granted_is_forbidden_and_4403(relay):
    ws = await ws_connect(relay, token=relay.token(topics=["a"]), topics=["b"])
    frames, code = await expect_close(ws)
    errs = [f for f in frames if f.get("op") == "error"]
    assert errs and errs[0]["code"] == "forbidden" and errs[0].get("topic") == "b", frames
    assert code == 4403, code


@async_test
async def test_url_topics_one_not_granted_is_4403(relay):
    ws = await ws_connect(relay, token=relay.token(topics=["a"]), topics=["a", "b"])
    frames, code = await expect_close(ws)
    assert any(f.get("code") == "forbidden" and f.get("topic") == "b" for f in frames), frames
    assert code == 4403


# ---------------------------------------------------------------------------------------------
# expiry and refresh

@pytest.mark.slow
@async_test
async def test_token_expiring_while_connected_closes_4401(relay):
    tok = relay.token(topics=["t"], exp_in=2)
    exp = decode_jwt(tok)[1]["exp"]
    ws = await ws_connect(relay, token=tok, topics=["t"])
    assert (await recv_json(ws))["op"] == "subscribed"
    frames, code = await expect_close(ws, timeout=exp - time.time() + 3)
    closed_at = time.time()
    assert frames and frames[-1].get("op") == "error" and frames[-1].get("code") == "unauthorized"
    assert code == 4401
    assert closed_at >= exp - 0.05, f"closed {exp - closed_at:.2f}s before exp"
    assert closed_at <= exp + 1.5, f"closed {closed_at - exp:.2f}s after exp (contract: within 1s)"


@pytest.mark.slow
@async_test
async def test_refresh_before_exp_keeps_the_connection(relay):
    old = relay.token(sub="u1", topics=["t"], exp_in=2)
    old_exp = decode_jwt(old)[1]["exp"]
    ws = await ws_connect(relay, token=old, topics=["t"])
    await recv_json(ws)
    new = relay.token(sub="u1", topics=["t"], exp_in=3600)
    new_exp = decode_jwt(new)[1]["exp"]
    await send_json(ws, {"op": "refresh", "token": new})
    assert await recv_json(ws) == {"op": "refreshed", "exp": new_exp}
    await asyncio.sleep(max(0.0, old_exp - time.time()) + 1.5)
    await ping_pong(ws)
    assert await relay.aemit([b'{"topic":"t","n":1}']) == []
    assert await recv_events(ws, 1) == [{"seq": 1, "topic": "t", "n": 1}]


@async_test
async def test_refresh_with_another_sub_closes_4401(relay):
    ws = await ws_connect(relay, token=relay.token(sub="u1", topics=["t"]))
    await send_json(ws, {"op": "refresh", "token": relay.token(sub="u2", topics=["t"])})
    await assert_unauthorized_close(ws)


@pytest.mark.parametrize("kind", ["bad-signature", "expired", "garbage", "alg-none"])
@async_test
async def test_refresh_with_invalid_token_closes_4401(relay, kind):
    tok = {
        "bad-signature": lambda: relay.token(sub="u1", topics=["t"], secret="wrong"),
        "expired": lambda: relay.token(sub="u1", topics=["t"], exp_in=-10),
        "garbage": lambda: "garbage",
        "alg-none": lambda: relay.token(sub="u1", topics=["t"], alg="none", sign_alg="none"),
    }[kind]()
    ws = await ws_connect(relay, token=relay.token(sub="u1", topics=["t"]))
    await send_json(ws, {"op": "refresh", "token": tok})
    await assert_unauthorized_close(ws)


@async_test
async def test_refresh_that_no_longer_covers_a_topic_unsubscribes_it(relay):
    ws = await ws_connect(relay, token=relay.token(sub="u1", topics=["a", "b:*"]),
                          topics=["a", "b:1"])
    assert [(await recv_json(ws))["op"] for _ in range(2)] == ["subscribed", "subscribed"]
    new = relay.token(sub="u1", topics=["a"], exp_in=3000)
    await send_json(ws, {"op": "refresh", "token": new})
    frames = [await recv_json(ws) for _ in range(2)]
    assert {"op": "refreshed", "exp": decode_jwt(new)[1]["exp"]} in frames, frames
    assert {"op": "unsubscribed", "topic": "b:1", "reason": "forbidden"} in frames, frames
    assert await relay.aemit([b'{"topic":"b:1","n":1}', b'{"topic":"a","n":2}']) == []
    assert await recv_events(ws, 1) == [{"seq": 1, "topic": "a", "n": 2}]
    # the new grants apply to new subscriptions too
    f = await _sub_result(ws, "b:2")
    assert f.get("code") == "forbidden", f


@pytest.mark.slow
@async_test
async def test_refresh_extends_to_new_exp_then_expires(relay):
    ws = await ws_connect(relay, token=relay.token(topics=["t"], exp_in=1))
    new = relay.token(topics=["t"], exp_in=3)
    new_exp = decode_jwt(new)[1]["exp"]
    await send_json(ws, {"op": "refresh", "token": new})
    assert await recv_json(ws) == {"op": "refreshed", "exp": new_exp}
    frames, code = await expect_close(ws, timeout=new_exp - time.time() + 3)
    assert time.time() >= new_exp - 0.05
    assert code == 4401 and frames[-1].get("code") == "unauthorized"


# ---------------------------------------------------------------------------------------------
# origins

@async_test
async def test_allow_origin_refuses_other_origins_with_403(relay_factory):
    relay = relay_factory("--allow-origin", "http://good.example")
    with pytest.raises(InvalidStatus) as ei:
        await ws_connect(relay, origin="http://evil.example")
    assert ei.value.response.status_code == 403


@pytest.mark.parametrize("origin", ["http://good.example", "https://also.example", None])
@async_test
async def test_allow_origin_accepts_listed_and_missing_origin(relay_factory, origin):
    relay = relay_factory("--allow-origin", "http://good.example",
                          "--allow-origin", "https://also.example")
    ws = await ws_connect(relay, origin=origin, topics=["t"])
    assert (await recv_json(ws))["op"] == "subscribed"


@async_test
async def test_any_origin_without_allow_origin(relay):
    ws = await ws_connect(relay, origin="http://evil.example", topics=["t"])
    assert (await recv_json(ws))["op"] == "subscribed"


# ---------------------------------------------------------------------------------------------
# logs never carry a token

@async_test
async def test_tokens_never_appear_in_the_log(relay):
    good = relay.token(sub="u1", topics=["t"])
    bad = relay.token(sub="u1", topics=["t"], secret="wrong")
    expired = relay.token(sub="u1", topics=["t"], exp_in=-5)
    ws = await ws_connect(relay, token=good, topics=["t"])
    await recv_json(ws)
    refresh = relay.token(sub="u1", topics=["t"], exp_in=1000)
    await send_json(ws, {"op": "refresh", "token": refresh})
    await recv_json(ws)
    for tok in (bad, expired):
        w = await ws_connect(relay, token=tok)
        await expect_close(w)
    w = await ws_connect(relay, token=bad, bearer=True)
    await expect_close(w)
    await ws.close()
    relay.stop()
    log = relay.log_text()
    assert log.strip(), "the relay logged nothing at --log-level debug"
    for tok in (good, bad, expired, refresh):
        sig = tok.split(".")[2]
        assert sig not in log, "a token signature appears in the log"
        assert tok.split(".")[1] not in log, "a token payload appears in the log"
