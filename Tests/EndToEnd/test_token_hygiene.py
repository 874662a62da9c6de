"""Token hygiene (issue 14, part 2), at the command line and on the wire: a short secret stops
`serve` (exit 2, saying how to make a good one), two key files and rotation by SIGHUP with
connections open, `kid`, `--jwt-audience`/`--jwt-issuer`, `--jwt-leeway`, the refresh rate, and
a relay at `--log-level trace` that never logs a token, nor puts a sub or a topic in /metrics or
/stats."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import signal
import time

import pytest

from relaylib import (
    async_test, b64url, decode_jwt, expect_close, free_port, give_to_relay_user, mint_jwt,
    ping_pong, recv_events, recv_json, run_cli, send_json, short_tmpdir, wait_until, ws_connect,
    write_secret,
)


def nonempty_lines(b: bytes) -> list[str]:
    return [l for l in b.decode("utf-8", "replace").splitlines() if l.strip()]


@pytest.fixture
def tmp():
    d = short_tmpdir("prhyg-")
    give_to_relay_user(d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def serve_args(tmp, *extra):
    return ["serve", "--socket", str(tmp / "p.sock"), "--listen", f"127.0.0.1:{free_port()}", *extra]


async def assert_refused(ws, words: str = "", timeout: float = 5):
    frames, code = await expect_close(ws, timeout=timeout)
    assert code == 4401, (code, frames)
    assert frames and frames[0].get("op") == "error" and frames[0].get("code") == "unauthorized", frames
    assert words in frames[0].get("message", ""), frames
    return frames[0]


async def assert_accepted(ws, topic="t"):
    f = await recv_json(ws)
    assert f.get("op") == "subscribed" and f.get("topic") == topic, f
    return f


def token(secret: str | bytes, sub="u1", topics=("t",), exp_in=3600, kid=None, **claims) -> str:
    now = int(time.time())
    body = {"sub": sub, "topics": list(topics), "iat": now, "exp": now + exp_in, **claims}
    return mint_jwt(secret, body, header={"kid": kid} if kid else None)


# ---------------------------------------------------------------------------------------------
# secrets: at least 32 bytes, no padding

@pytest.mark.parametrize("length", [1, 16, 31])
def test_a_secret_under_32_bytes_stops_serve_with_status_2_saying_how_to_make_one(tmp, length):
    secret = write_secret(tmp / "relay.secret", "k" * length + "\n")
    cp = run_cli(serve_args(tmp, "--jwt-secret-file", secret), timeout=10)
    assert cp.returncode == 2, (cp.returncode, cp.stderr)
    lines = nonempty_lines(cp.stderr)
    assert len(lines) == 1, lines
    assert lines[0].startswith("progress-relay: --jwt-secret-file " + secret), lines
    assert f"{length} bytes" in lines[0] and "at least 32" in lines[0], lines
    assert "head -c 32 /dev/urandom | base64" in lines[0], lines
    # `token` refuses it too: the relay could never accept what it would sign
    cp = run_cli(["token", "--jwt-secret-file", secret, "--sub", "x"])
    assert cp.returncode == 2 and cp.stdout == b"", (cp.returncode, cp.stdout, cp.stderr)
    assert "head -c 32 /dev/urandom | base64" in cp.stderr.decode(), cp.stderr


def test_the_suggested_secret_starts_the_relay(relay_factory):
    # what `head -c 32 /dev/urandom | base64` makes: 44 bytes, enough for HS256 (not HS384)
    import base64
    relay = relay_factory(secret=base64.b64encode(secrets.token_bytes(32)).decode())
    assert len(relay.secret) == 44
    assert relay.stats().get("keys") == 1


@async_test
async def test_hs384_needs_48_bytes_and_hs512_64(relay_factory):
    relay = relay_factory(secret="s" * 48)   # HS256 and HS384, not HS512
    for alg, ok in [("HS256", True), ("HS384", True), ("HS512", False)]:
        ws = await ws_connect(relay, token=relay.token(topics=["t"], alg=alg), topics=["t"])
        if ok:
            await assert_accepted(ws)
            await ws.close()
        else:
            await assert_refused(ws, "algorithm")


# ---------------------------------------------------------------------------------------------
# two key files, kid, rotation by SIGHUP

def two_key_relay(relay_factory, *extra):
    """The relay's own `secret` file (kid "secret") and `retiring.secret` (kid "retiring")."""
    relay = relay_factory(start=False)
    relay.retiring = secrets.token_hex(32)
    relay.retiring_file = write_secret(relay.dir / "retiring.secret", relay.retiring + "\n")
    relay.extra_args += ["--jwt-secret-file", relay.retiring_file, *extra]
    return relay.start()


def reload_count(relay) -> int:
    return relay.log_text().count("SIGHUP received")


async def sighup(relay):
    before = reload_count(relay)
    relay.send_signal(signal.SIGHUP)
    await asyncio.to_thread(wait_until, lambda: reload_count(relay) > before or not relay.running, 5,
                            what="the SIGHUP log line")
    assert relay.running, "the relay died on SIGHUP"
    return [l for l in relay.log_text().splitlines() if "SIGHUP received" in l][-1]


@async_test(timeout=90)
async def test_two_key_files_and_rotation_by_sighup_with_connections_open(relay_factory):
    relay = two_key_relay(relay_factory)
    assert relay.stats()["keys"] == 2
    # tokens without kid: either key; with kid: the named one only; an unknown kid: refused
    for tok in [token(relay.secret), token(relay.retiring), token(relay.retiring, kid="retiring"),
                token(relay.secret, kid="secret")]:
        ws = await ws_connect(relay, token=tok, topics=["t"])
        await assert_accepted(ws)
        await ws.close()
    for tok, words in [(token(relay.secret, kid="retiring"), "signature"),
                       (token(relay.secret, kid="2026"), "kid")]:
        await assert_refused(await ws_connect(relay, token=tok, topics=["t"]), words)

    # sessions on the key about to be replaced: one ends soon (exp), one lasts
    old_short = await ws_connect(relay, token=token(relay.secret, exp_in=8), topics=["t"])
    await assert_accepted(old_short)
    old_long = await ws_connect(relay, token=token(relay.secret, kid="secret"), topics=["t"])
    await assert_accepted(old_long)
    t_connected = time.time()

    # rotation: a new key in the file of the key being retired, then SIGHUP
    new = secrets.token_hex(32)
    write_secret(relay.secret_file, new + "\n")
    line = await sighup(relay)
    assert "keys reloaded" in line and " notice " in line, line
    assert relay.secret not in relay.log_text() and new not in relay.log_text()
    assert relay.stats()["keys"] == 2

    # old-key sessions keep running
    assert await relay.aemit([b'{"topic":"t","n":1}']) == []
    assert (await recv_events(old_short, 1))[0]["n"] == 1
    assert (await recv_events(old_long, 1))[0]["n"] == 1
    # new connections need a configured key: the replaced one is refused, the new one accepted
    await assert_refused(await ws_connect(relay, token=token(relay.secret), topics=["t"]), "signature")
    for tok in [token(new), token(new, kid="secret"), token(relay.retiring)]:
        ws = await ws_connect(relay, token=tok, topics=["t"])
        await assert_accepted(ws)
        await ws.close()

    # a reload that fails keeps the keys and says why
    write_secret(relay.retiring_file, "short\n")
    line = await sighup(relay)
    assert " error " in line and "NOT reloaded" in line and "too short" in line, line
    assert "retiring.secret" in line, line
    assert relay.stats()["keys"] == 2
    ws = await ws_connect(relay, token=token(relay.retiring), topics=["t"])
    await assert_accepted(ws)
    await ws.close()

    # the short old-key session still ends at its exp, within a second
    await assert_refused(old_short, "expired", timeout=12)
    assert time.time() <= t_connected + 8 + 2.5
    await ping_pong(old_long)


def test_key_file_flags_are_checked(tmp):
    files = [write_secret(tmp / f"k{i}.secret", secrets.token_hex(32) + "\n") for i in range(3)]
    cases = [
        (["--jwt-secret-file", files[0], "--jwt-secret-file", files[1], "--jwt-secret-file", files[2]],
         "--jwt-secret-file", "at most twice"),
        (["--jwt-secret-file", files[0], "--jwt-kid", "nope.secret=x"], "--jwt-kid", "not a"),
        (["--jwt-secret-file", files[0], "--jwt-kid", "k0.secret"], "--jwt-kid", "FILE=KID"),
        (["--jwt-secret-file", files[0], "--jwt-secret-file", files[1], "--jwt-kid", "k1.secret=k0"],
         "", "both have kid k0"),
        (["--jwt-secret-file", files[0], "--jwt-leeway", "301"], "--jwt-leeway", "0 to 300"),
        (["--jwt-secret-file", files[0], "--jwt-leeway", "-1"], "--jwt-leeway", "0 to 300"),
        (["--jwt-secret-file", files[0], "--jwt-audience", ""], "--jwt-audience", "empty"),
    ]
    for extra, flag, words in cases:
        cp = run_cli(serve_args(tmp, *extra), timeout=10)
        assert cp.returncode == 2, (extra, cp.returncode, cp.stderr)
        lines = nonempty_lines(cp.stderr)
        assert len(lines) == 1 and flag in lines[0] and words in lines[0], (extra, lines)


@async_test
async def test_jwt_kid_names_a_files_kid(relay_factory):
    relay = two_key_relay(relay_factory, "--jwt-kid", "retiring.secret=2025-12")
    ws = await ws_connect(relay, token=token(relay.retiring, kid="2025-12"), topics=["t"])
    await assert_accepted(ws)
    await assert_refused(await ws_connect(relay, token=token(relay.retiring, kid="retiring"), topics=["t"]),
                         "kid")
    # the environment takes the key files as a list, as every repeatable flag
    env_relay = relay_factory(flags=False, start=False, env={
        "PROGRESS_RELAY_JWT_SECRET_FILE": f"{relay.secret_file},{relay.retiring_file}",
        "PROGRESS_RELAY_JWT_KID": f"{relay.retiring_file}=old"})
    env_relay.extra_args = ["--socket", env_relay.socket_path, "--listen", f"127.0.0.1:{env_relay.port}"]
    env_relay.start()
    assert env_relay.stats()["keys"] == 2
    ws = await ws_connect(env_relay, token=token(relay.retiring, kid="old"), topics=["t"])
    await assert_accepted(ws)


# ---------------------------------------------------------------------------------------------
# aud, iss

@async_test
async def test_jwt_audience_refuses_a_wrong_or_missing_aud(relay_factory):
    relay = relay_factory("--jwt-audience", "progress-relay")
    for aud in ["progress-relay", ["web", "progress-relay"]]:
        ws = await ws_connect(relay, token=token(relay.secret, aud=aud), topics=["t"])
        await assert_accepted(ws)
        await ws.close()
    await assert_refused(await ws_connect(relay, token=token(relay.secret, aud="billing"), topics=["t"]), "aud")
    await assert_refused(await ws_connect(relay, token=token(relay.secret), topics=["t"]), "aud")
    # a refresh with another audience's token ends the session
    ws = await ws_connect(relay, token=token(relay.secret, aud="progress-relay"), topics=["t"])
    await assert_accepted(ws)
    await send_json(ws, {"op": "refresh", "token": token(relay.secret, aud="billing")})
    await assert_refused(ws, "aud")
    # `progress-relay token` writes aud "progress-relay" by default
    cp = await asyncio.to_thread(run_cli, ["token", "--jwt-secret-file", relay.secret_file, "--sub", "u1",
                                           "--topic", "t"])
    assert cp.returncode == 0, cp.stderr
    minted = cp.stdout.decode().strip()
    assert decode_jwt(minted)[1]["aud"] == "progress-relay"
    await assert_accepted(await ws_connect(relay, token=minted, topics=["t"]))
    cp = await asyncio.to_thread(run_cli, ["token", "--jwt-secret-file", relay.secret_file, "--sub", "u1",
                                           "--aud", ""])
    assert "aud" not in decode_jwt(cp.stdout.decode().strip())[1]


@async_test
async def test_jwt_issuer_must_match(relay_factory):
    relay = relay_factory("--jwt-issuer", "https://app.example")
    await assert_accepted(await ws_connect(relay, token=token(relay.secret, iss="https://app.example"),
                                           topics=["t"]))
    await assert_refused(await ws_connect(relay, token=token(relay.secret, iss="https://evil.example"),
                                          topics=["t"]), "iss")
    await assert_refused(await ws_connect(relay, token=token(relay.secret), topics=["t"]), "iss")


# ---------------------------------------------------------------------------------------------
# leeway

@async_test(timeout=60)
async def test_no_leeway_by_default_and_jwt_leeway_extends_the_session(relay_factory):
    plain = relay_factory()
    await assert_refused(await ws_connect(plain, token=token(plain.secret, exp_in=-1), topics=["t"]), "expired")
    now = int(time.time())
    future_iat = mint_jwt(plain.secret, {"sub": "u", "topics": ["t"], "iat": now + 30, "exp": now + 600})
    await assert_refused(await ws_connect(plain, token=future_iat, topics=["t"]), "iat")

    relay = relay_factory("--jwt-leeway", "4")
    # expired 1 s ago, within the leeway: accepted, then closed within a second of exp + 4
    tok = token(relay.secret, exp_in=-1)
    exp = decode_jwt(tok)[1]["exp"]
    ws = await ws_connect(relay, token=tok, topics=["t"])
    await assert_accepted(ws)
    await assert_refused(ws, "expired")
    closed = time.time()
    assert exp + 4 - 0.3 <= closed <= exp + 4 + 1.5, (closed - exp)
    await assert_accepted(await ws_connect(relay, token=mint_jwt(
        relay.secret, {"sub": "u", "topics": ["t"], "iat": now + 3, "exp": now + 600}), topics=["t"]))
    await assert_refused(await ws_connect(relay, token=token(relay.secret, exp_in=-10), topics=["t"]),
                         "expired")


# ---------------------------------------------------------------------------------------------
# refresh rate

@async_test(timeout=60)
async def test_at_most_one_refresh_per_10_seconds(relay):
    ws = await ws_connect(relay, token=relay.token(sub="u1", topics=["t"], exp_in=600), topics=["t"])
    await assert_accepted(ws)
    first = relay.token(sub="u1", topics=["t"], exp_in=700)
    await send_json(ws, {"op": "refresh", "token": first})
    assert await recv_json(ws) == {"op": "refreshed", "exp": decode_jwt(first)[1]["exp"]}
    t_first = time.monotonic()
    for _ in range(3):
        await send_json(ws, {"op": "refresh", "token": relay.token(sub="u1", topics=["t"], exp_in=800)})
        f = await recv_json(ws)
        assert f.get("op") == "error" and f.get("code") == "bad_request", f
        assert "refresh" in f.get("message", ""), f
    # the connection stays, on the first refresh's token
    await ping_pong(ws)
    assert await relay.aemit([b'{"topic":"t","n":1}']) == []
    assert (await recv_events(ws, 1))[0]["n"] == 1
    await asyncio.sleep(max(0.0, 10.2 - (time.monotonic() - t_first)))
    again = relay.token(sub="u1", topics=["t"], exp_in=900)
    await send_json(ws, {"op": "refresh", "token": again})
    assert await recv_json(ws) == {"op": "refreshed", "exp": decode_jwt(again)[1]["exp"]}


# ---------------------------------------------------------------------------------------------
# nothing leaks

@async_test(timeout=60)
async def test_trace_log_metrics_and_stats_never_carry_a_token_sub_or_topic(relay_factory):
    relay = relay_factory("--log-level", "trace")
    sub, topic = "sub-canary-7f3a", "topic-canary-91bd"
    tokens = {
        "query": relay.token(sub=sub, topics=[topic]),
        "header": relay.token(sub=sub, topics=[topic], exp_in=3599),
        "refused": relay.token(sub=sub, topics=[topic], secret="not-the-secret-" * 3),
        "refresh": relay.token(sub=sub, topics=[topic], exp_in=3000),
        "expired": relay.token(sub=sub, topics=[topic], exp_in=-5),
    }
    ws_q = await ws_connect(relay, token=tokens["query"], topics=[topic])
    await assert_accepted(ws_q, topic)
    ws_h = await ws_connect(relay, token=tokens["header"], topics=[topic], bearer=True)
    await assert_accepted(ws_h, topic)
    await send_json(ws_h, {"op": "refresh", "token": tokens["refresh"]})
    assert (await recv_json(ws_h))["op"] == "refreshed"
    await assert_refused(await ws_connect(relay, token=tokens["refused"], topics=[topic]))
    await assert_refused(await ws_connect(relay, token=tokens["expired"], topics=[topic], bearer=True))
    assert await relay.aemit([{"topic": topic, "n": 1}]) == []
    await recv_events(ws_q, 1)
    # plain HTTP with a token in the query and in the header
    relay.http(f"/stats?token={tokens['query']}", headers={"Authorization": f"Bearer {tokens['header']}"})
    await ws_q.close()
    await ws_h.close()
    metrics = relay.metrics()
    stats = relay.http("/stats")[1]
    await asyncio.sleep(0.3)
    log = relay.log_text()
    assert " trace " in log or " debug " in log, "the relay logged nothing below info"
    for name, tok in tokens.items():
        header, payload, signature = tok.split(".")
        for part, text in [("token", tok), ("payload", payload), ("signature", signature)]:
            assert text not in log, f"the {name} token's {part} is in the log"
            assert text not in metrics and text not in stats, f"the {name} token's {part} is served"
    assert "token=" not in log and "Bearer " not in log, "a query string or a request header is in the log"
    for text in (sub, topic):
        assert text not in metrics, f"{text} in /metrics"
        assert text not in stats, f"{text} in /stats"
