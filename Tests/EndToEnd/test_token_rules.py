"""Tokens and origins (issue 12, section 4): a token without `exp` is refused unless allowed,
`progress-relay token` refuses what the relay would refuse, `--allow-origin` values are checked
and compared as browsers send them, and the relay's own page is always allowed."""

from __future__ import annotations

import shutil

import pytest

from relaylib import (
    InvalidStatus, RawWS, async_test, expect_close, free_port, give_to_relay_user, recv_events,
    recv_json, run_cli, send_json, short_tmpdir, ws_connect, write_secret,
)


def nonempty_lines(b: bytes) -> list[str]:
    return [l for l in b.decode("utf-8", "replace").splitlines() if l.strip()]


@pytest.fixture
def tmp():
    d = short_tmpdir("prtok-")
    give_to_relay_user(d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


async def assert_refused_for_no_exp(ws):
    frames, code = await expect_close(ws)
    assert len(frames) == 1, frames
    f = frames[0]
    assert f.get("op") == "error" and f.get("code") == "unauthorized", f
    assert "no exp" in f.get("message", ""), f
    assert code == 4401, f"close code {code}, expected 4401"


# ---------------------------------------------------------------------------------------------
# exp

@async_test
async def test_token_without_exp_is_refused_by_default(relay):
    ws = await ws_connect(relay, token=relay.token(topics=["*"], exp_in=None), topics=["t"])
    await assert_refused_for_no_exp(ws)


@async_test
async def test_refresh_with_a_token_without_exp_closes_4401(relay):
    ws = await ws_connect(relay, token=relay.token(sub="u1", topics=["t"]), topics=["t"])
    assert (await recv_json(ws))["op"] == "subscribed"
    await send_json(ws, {"op": "refresh", "token": relay.token(sub="u1", topics=["t"], exp_in=None)})
    await assert_refused_for_no_exp(ws)


@pytest.mark.parametrize("how", ["flag", "environment"])
@async_test
async def test_tokens_without_exp_are_accepted_when_allowed(relay_factory, how):
    if how == "flag":
        relay = relay_factory("--allow-tokens-without-exp")
    else:
        relay = relay_factory(env={"PROGRESS_RELAY_ALLOW_TOKENS_WITHOUT_EXP": "1"})
    # the relay warns when it starts: such a token, once leaked, is valid forever
    logged = [l for l in relay.log_text().splitlines() if not l.startswith("=====")]
    assert any(" warning " in l and "--allow-tokens-without-exp" in l for l in logged), logged
    ws = await ws_connect(relay, token=relay.token(sub="u1", topics=["t"], exp_in=None),
                          topics=["t"])
    assert (await recv_json(ws))["op"] == "subscribed"
    await send_json(ws, {"op": "refresh", "token": relay.token(sub="u1", topics=["t"], exp_in=None)})
    f = await recv_json(ws)
    assert f.get("op") == "refreshed", f
    assert await relay.aemit([b'{"topic":"t","n":1}']) == []
    assert await recv_events(ws, 1) == [{"seq": 1, "topic": "t", "n": 1}]


# ---------------------------------------------------------------------------------------------
# progress-relay token

@pytest.mark.parametrize("args, flag", [
    (["--sub", ""], "--sub"),
    (["--sub", "x", "--topic", "bad topic"], "--topic"),
    (["--sub", "x", "--topic", "a*b"], "--topic"),
    (["--sub", "x", "--topic", "task:1", "--topic", ""], "--topic"),
], ids=["empty-sub", "topic-with-space", "star-not-at-the-end", "empty-topic"])
def test_token_command_refuses_a_token_the_relay_would_refuse(tmp, args, flag):
    secret = write_secret(tmp / "secret", "k" * 32 + "\n")
    cp = run_cli(["token", "--jwt-secret-file", secret, *args])
    assert cp.returncode == 2, (cp.returncode, cp.stdout, cp.stderr)
    assert cp.stdout == b"", "a token was printed anyway"
    lines = nonempty_lines(cp.stderr)
    assert len(lines) == 1, f"expected a one-line error, got: {lines}"
    assert lines[0].startswith("progress-relay: ") and flag in lines[0], lines


# ---------------------------------------------------------------------------------------------
# --allow-origin

@pytest.mark.parametrize("value", ["not an origin", "https://App.Example.com/", "app.example.com",
                                   "https://app.example.com/path", "https://app.example.com:99999"])
def test_malformed_allow_origin_is_status_2_naming_the_flag(tmp, value):
    secret = write_secret(tmp / "secret", "k" * 32 + "\n")
    cp = run_cli(["serve", "--socket", str(tmp / "p.sock"), "--listen", f"127.0.0.1:{free_port()}",
                  "--jwt-secret-file", secret, "--allow-origin", value], timeout=10)
    assert cp.returncode == 2, (cp.returncode, cp.stderr)
    lines = nonempty_lines(cp.stderr)
    assert len(lines) == 1, f"expected a one-line error, got: {lines}"
    assert lines[0].startswith("progress-relay: --allow-origin"), lines


@async_test
async def test_allow_origin_compares_scheme_and_host_as_browsers_send_them(relay_factory):
    relay = relay_factory("--allow-origin", "https://App.Example.com")
    for origin in ["https://app.example.com", "https://APP.example.com:443",
                   "HTTPS://app.EXAMPLE.com"]:
        try:
            ws = await ws_connect(relay, origin=origin, topics=["t"])
        except InvalidStatus as e:
            raise AssertionError(f"Origin {origin} refused with HTTP {e.response.status_code}")
        assert (await recv_json(ws))["op"] == "subscribed", origin
        await ws.close()
    for origin in ["https://other.example.com", "http://app.example.com",
                   "https://app.example.com:8443", "https://app.example.com.evil.example"]:
        with pytest.raises(InvalidStatus) as ei:
            await ws_connect(relay, origin=origin)
        assert ei.value.response.status_code == 403, origin


def test_allow_origin_still_admits_the_relays_own_page(relay_factory):
    relay = relay_factory("--allow-origin", "https://app.example.com")
    # the page at http://127.0.0.1:PORT/ opens its WebSocket with that Origin and that Host
    own = RawWS.for_relay(relay, topics=["t"], headers={"Origin": f"http://127.0.0.1:{relay.port}"})
    try:
        assert own.status == 101, (own.status, own.headers)
        f = own.recv_json()
        assert f["op"] == "subscribed" and f["topic"] == "t", f
    finally:
        own.close()
    # another port of the same host is another origin
    other_port = free_port()
    other = RawWS.for_relay(relay, headers={"Origin": f"http://127.0.0.1:{other_port}"})
    try:
        assert other.status == 403, (other.status, other.headers)
    finally:
        other.close()
