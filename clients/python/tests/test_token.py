"""progress_relay.token(): HS256 tokens the relay accepts, with the claims and lifetime asked."""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import json
import time
import urllib.parse

import pytest
from prhelpers import ws_connect, ws_kwargs
from websockets.exceptions import ConnectionClosed

import progress_relay

SECRET = "s3cret-s3cret-s3cret-s3cret-s3cret"


def decode(token: str):
    def part(s):
        return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
    h, p, s = token.split(".")
    return json.loads(part(h)), json.loads(part(p)), part(s), f"{h}.{p}".encode()


def test_claims_header_and_signature():
    before = int(time.time())
    tok = progress_relay.token(SECRET, "alice", ["task:*", "user:alice:*"], 600)
    after = int(time.time())
    header, payload, sig, signing_input = decode(tok)
    assert header == {"alg": "HS256", "typ": "JWT"}
    assert set(payload) == {"sub", "topics", "iat", "exp", "aud"}
    assert payload["aud"] == "progress-relay"
    assert payload["sub"] == "alice"
    assert payload["topics"] == ["task:*", "user:alice:*"]
    assert before <= payload["iat"] <= after
    assert payload["exp"] == payload["iat"] + 600
    assert sig == hmac.new(SECRET.encode(), signing_input, hashlib.sha256).digest()
    assert "=" not in tok


@pytest.mark.parametrize("ttl,seconds", [
    (90, 90), (90.9, 90), ("45", 45), ("30s", 30), ("15m", 900), ("1h", 3600), ("2d", 172800),
    (datetime.timedelta(minutes=5), 300),
])
def test_ttl_forms(ttl, seconds):
    _, payload, _, _ = decode(progress_relay.token(SECRET.encode(), "u", "task:1", ttl, now=1000))
    assert payload["iat"] == 1000 and payload["exp"] == 1000 + seconds
    assert payload["topics"] == ["task:1"]


def test_bad_arguments_raise():
    for kwargs in [dict(ttl=0), dict(ttl=-5), dict(ttl="1w"), dict(ttl="soon"),
                   dict(ttl=float("inf")), dict(secret=""), dict(sub=""), dict(topics=[""]),
                   dict(topics=[1]), dict(secret="k" * 31), dict(aud=""), dict(aud=5)]:
        args = dict(secret=SECRET, sub="u", topics=["t"], ttl=60)
        args.update(kwargs)
        with pytest.raises((ValueError, TypeError)):
            progress_relay.token(**args)


def test_extra_claims():
    _, payload, _, _ = decode(progress_relay.token(SECRET, "u", [], 60, claims={"nbf": 5}))
    assert payload["nbf"] == 5 and payload["topics"] == []


def test_aud_can_be_changed_or_left_out():
    _, payload, _, _ = decode(progress_relay.token(SECRET, "u", [], 60, aud="other"))
    assert payload["aud"] == "other"
    _, payload, _, _ = decode(progress_relay.token(SECRET, "u", [], 60, aud=None))
    assert "aud" not in payload


def test_a_short_secret_is_refused_as_the_relay_refuses_it():
    with pytest.raises(ValueError, match="at least 32"):
        progress_relay.token("s3cret", "u", [], 60)
    progress_relay.token("k" * 32, "u", [], 60)


def test_read_secret(tmp_path):
    f = tmp_path / "s"
    f.write_bytes(b"abc\n")
    assert progress_relay.read_secret(str(f)) == b"abc"
    f.write_bytes(b"abc\r\n")
    assert progress_relay.read_secret(str(f)) == b"abc"
    f.write_bytes(b"abc\n\n")
    assert progress_relay.read_secret(str(f)) == b"abc\n"
    f.write_bytes(b"abc")
    assert progress_relay.read_secret(str(f)) == b"abc"


async def _open(relay, token, topics=()):
    q = [("token", token)] + [("topic", t) for t in topics]
    return await ws_connect(relay.url + "?" + urllib.parse.urlencode(q), **ws_kwargs())


async def _recv(ws, timeout=5):
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


def test_relay_accepts_the_token_and_its_grants(relay):
    secret = progress_relay.read_secret(relay.secret_file)

    async def main():
        tok = progress_relay.token(secret, "alice", ["task:*"], "10m")
        ws = await _open(relay, tok, ["task:42"])
        f = await _recv(ws)
        assert f["op"] == "subscribed" and f["topic"] == "task:42", f
        await ws.send(json.dumps({"op": "subscribe", "topic": "other"}))
        f = await _recv(ws)
        assert f["op"] == "error" and f["code"] == "forbidden", f
        await ws.send(json.dumps({"op": "subscribe", "topic": "task:*"}))
        f = await _recv(ws)
        assert f["op"] == "subscribed" and f["topic"] == "task:*", f
        await ws.close()
        # the secret given as text works the same
        ws = await _open(relay, progress_relay.token(relay.secret, "bob", "task:1", 60),
                         ["task:1"])
        assert (await _recv(ws))["op"] == "subscribed"
        await ws.close()

    asyncio.run(main())


def test_relay_refuses_a_token_signed_with_another_secret(relay):
    async def main():
        forged = progress_relay.token("not-the-secret-not-the-secret-00", "eve", ["*"], 60)
        ws = await _open(relay, forged)
        f = await _recv(ws)
        assert f["op"] == "error" and f["code"] == "unauthorized", f
        with pytest.raises(ConnectionClosed) as exc:
            await _recv(ws)
        assert exc.value.rcvd.code == 4401

    asyncio.run(main())


def test_relay_ends_the_connection_when_the_token_expires(relay):
    async def main():
        tok = progress_relay.token(relay.secret, "alice", ["task:*"], 2)
        exp = decode(tok)[1]["exp"]
        ws = await _open(relay, tok, ["task:1"])
        assert (await _recv(ws))["op"] == "subscribed"
        f = await _recv(ws, timeout=6)
        assert f["op"] == "error" and f["code"] == "unauthorized", f
        # the relay allows no leeway and checks within a second of exp
        assert exp <= time.time() < exp + 2.5
        with pytest.raises(ConnectionClosed) as exc:
            await _recv(ws)
        assert exc.value.rcvd.code == 4401

    asyncio.run(main())
