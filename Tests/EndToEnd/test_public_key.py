"""Contract sections 3 and 5: --jwt-public-key-file (RS256, ES256, EdDSA) and algorithm
confusion against a public key. Keys and signatures come from the `openssl` command."""

from __future__ import annotations

import time

import pytest

from relaylib import (
    async_test, expect_close, give_to_relay_user, have_openssl, mint_jwt, openssl_keypair,
    recv_json, run_cli, short_tmpdir, sign_jwt_openssl, ws_connect,
)

pytestmark = pytest.mark.skipif(not have_openssl(), reason="needs the openssl command")

KINDS = {"rsa": "RS256", "ec": "ES256", "ed25519": "EdDSA"}


@pytest.fixture(scope="module")
def keys():
    d = short_tmpdir("prkeys-")
    out = {kind: (openssl_keypair(kind, d), openssl_keypair(kind, d)) for kind in KINDS}
    give_to_relay_user(d)   # the relay reads the public keys as its own user
    yield out
    import shutil
    shutil.rmtree(d, ignore_errors=True)


def claims(exp_in=3600, **kw):
    now = int(time.time())
    return {"sub": "u1", "topics": ["*"], "iat": now, "exp": now + exp_in, **kw}


def pk_relay(relay_factory, pub):
    r = relay_factory(flags=False, start=False)
    r.extra_args = ["--socket", r.socket_path, "--listen", f"127.0.0.1:{r.port}",
                    "--jwt-public-key-file", str(pub), "--log-level", "debug"]
    return r.start()


async def accepted(r, tok) -> bool:
    ws = await ws_connect(r, token=tok, topics=["t"])
    f = await recv_json(ws)
    if f.get("op") == "subscribed":
        await ws.close()
        return True
    assert f.get("op") == "error" and f.get("code") == "unauthorized", f
    _, code = await expect_close(ws)
    assert code == 4401, code
    return False


@pytest.mark.parametrize("kind", list(KINDS))
@async_test(timeout=60)
async def test_public_key_tokens(relay_factory, keys, kind):
    alg = KINDS[kind]
    (priv, pub), (other_priv, _) = keys[kind]
    r = pk_relay(relay_factory, pub)
    assert await accepted(r, sign_jwt_openssl(claims(), alg, priv)), f"valid {alg} refused"
    # signed by another key of the same kind
    assert not await accepted(r, sign_jwt_openssl(claims(), alg, other_priv))
    # expired
    assert not await accepted(r, sign_jwt_openssl(claims(exp_in=-5), alg, priv))
    # alg confusion: HS256 keyed with the public key file's bytes
    pem = pub.read_bytes()
    for secret in (pem, pem.strip()):
        assert not await accepted(r, mint_jwt(secret, claims(), "HS256")), "HS256 with the PEM"
    # alg none
    assert not await accepted(r, mint_jwt(b"", claims(), "none", sign_alg="none"))
    # a header alg other than the key's own, on a signature the key verifies
    for other in {"RS256", "ES256", "EdDSA", "RS384", "PS256"} - {alg}:
        assert not await accepted(r, sign_jwt_openssl(claims(), alg, priv, header_alg=other)), \
            f"{alg} signature with header alg {other} accepted"


@pytest.mark.parametrize("kind", ["missing", "garbage"])
def test_bad_public_key_file_is_status_2_naming_the_flag(kind):
    d = short_tmpdir("prcli-")
    path = d / "key.pem"
    if kind == "garbage":
        path.write_text("-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n")
    give_to_relay_user(d)   # missing or garbage, not unreadable
    cp = run_cli(["serve", "--socket", str(d / "p.sock"), "--listen", "127.0.0.1:0",
                  "--jwt-public-key-file", str(path)], timeout=10)
    assert cp.returncode == 2, (cp.returncode, cp.stderr)
    lines = [l for l in cp.stderr.decode().splitlines() if l.strip()]
    assert len(lines) == 1 and "--jwt-public-key-file" in lines[0], lines
