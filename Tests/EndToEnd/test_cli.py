"""Contract section 3: the command line (serve flags and environment, emit, token)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import types

import pytest

from relaylib import (
    _retry_busy, async_test, decode_jwt, event_text, expect_nothing, free_port, recv_events, recv_json,
    recv_text, require_bin, run_cli, send_json, short_tmpdir, subscribe, verify_hs, ws_connect,
    assert_unprivileged, give_to_relay_user, unprivileged_prefix, write_secret,
)

JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


def nonempty_lines(b: bytes) -> list[str]:
    return [l for l in b.decode("utf-8", "replace").splitlines() if l.strip()]


@pytest.fixture
def tmp():
    import shutil
    d = short_tmpdir("prcli-")
    give_to_relay_user(d)   # the relay (and run_cli) run as the relay's user when we are root
    yield d
    shutil.rmtree(d, ignore_errors=True)


def serve_args(tmp, port=None, *extra):
    return ["serve", "--socket", str(tmp / "p.sock"),
            "--listen", f"127.0.0.1:{port or free_port()}", *extra]


def secret_file(tmp, secret="s3cret-for-cli-0123456789abcdef-0123") -> str:
    return write_secret(tmp / "secret", secret + "\n")


# ---------------------------------------------------------------------------------------------
# serve: refusing to start

def test_serve_help_lists_every_flag():
    cp = run_cli(["serve", "--help"])
    assert cp.returncode == 0, cp.stderr
    text = (cp.stdout + cp.stderr).decode()
    for flag in ["--socket", "--socket-mode", "--listen", "--jwt-secret-file",
                 "--jwt-public-key-file", "--grant", "--allow-origin", "--history",
                 "--max-event-bytes", "--max-outbound-bytes", "--max-inflight-bytes", "--ping-interval",
                 "--state-file", "--max-topics", "--max-subscriptions", "--topic-ttl", "--log-level",
                 "--dev", "--jwt-kid", "--jwt-audience", "--jwt-issuer", "--jwt-leeway"]:
        assert flag in text, f"serve --help does not mention {flag}"


def test_serve_without_key_refuses(tmp):
    cp = run_cli(serve_args(tmp), timeout=10)
    # the contract says "refuses to start and says why"; status 2 as for the other start errors
    assert cp.returncode == 2, (cp.returncode, cp.stderr)
    err = cp.stderr.decode()
    assert any(w in err for w in ("--jwt-secret-file", "--jwt-public-key-file", "--dev")), err
    assert not os.path.exists(tmp / "p.sock")


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_unreadable_secret_file_is_status_2_naming_the_flag(tmp, kind):
    path = tmp / "nope" if kind == "missing" else tmp
    cp = run_cli(serve_args(tmp, None, "--jwt-secret-file", str(path)), timeout=10)
    assert cp.returncode == 2, (cp.returncode, cp.stderr)
    lines = nonempty_lines(cp.stderr)
    assert len(lines) == 1, f"expected a one-line error, got: {lines}"
    assert "--jwt-secret-file" in lines[0]


@pytest.mark.parametrize("listen", ["nonsense", "127.0.0.1", "127.0.0.1:99999",
                                    "127.0.0.1:port", ":"])
def test_bad_listen_is_status_2_naming_the_flag(tmp, listen):
    cp = run_cli(["serve", "--socket", str(tmp / "p.sock"), "--listen", listen,
                  "--jwt-secret-file", secret_file(tmp)], timeout=10)
    assert cp.returncode == 2, (cp.returncode, cp.stderr)
    lines = nonempty_lines(cp.stderr)
    assert len(lines) == 1, f"expected a one-line error, got: {lines}"
    assert "--listen" in lines[0]


@pytest.mark.parametrize("flag,value", [("--max-inflight-bytes", "100"), ("--max-inflight-bytes", "x"),
                                        ("--max-outbound-bytes", "10")])
def test_byte_bounds_below_their_minimum_are_status_2_naming_the_flag(tmp, flag, value):
    cp = run_cli(serve_args(tmp, None, "--jwt-secret-file", secret_file(tmp), flag, value), timeout=10)
    assert cp.returncode == 2, (cp.returncode, cp.stderr)
    assert flag in cp.stderr.decode()
    assert not os.path.exists(tmp / "p.sock")


@pytest.mark.parametrize("pattern", ["has space", "a*b", "bad#char:*"])
def test_malformed_grant_is_status_2_naming_the_flag(tmp, pattern):
    cp = run_cli(serve_args(tmp, None, "--jwt-secret-file", secret_file(tmp), "--grant", pattern),
                 timeout=10)
    assert cp.returncode == 2, (cp.returncode, cp.stderr)
    lines = nonempty_lines(cp.stderr)
    assert len(lines) == 1, f"expected a one-line error, got: {lines}"
    assert "--grant" in lines[0]


# ---------------------------------------------------------------------------------------------
# --dev

class LineReader:
    def __init__(self, stream):
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._t.start()

    def _run(self, stream):
        for raw in iter(stream.readline, b""):
            self.lines.append(raw.decode("utf-8", "replace"))

    def wait_for(self, pred, timeout: float):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = pred("".join(self.lines))
            if v:
                return v
            time.sleep(0.05)
        raise AssertionError(f"not seen on stdout within {timeout}s; stdout so far:\n"
                             + "".join(self.lines))


@async_test(timeout=40)
async def test_dev_prints_token_and_url_and_serves(tmp):
    port = free_port()
    proc = _retry_busy(lambda: subprocess.Popen(
        [*unprivileged_prefix(), require_bin(), *serve_args(tmp, port, "--dev")],
        stdout=subprocess.PIPE,
        stderr=open(tmp / "dev-stderr.log", "wb"), stdin=subprocess.DEVNULL,
        # its secret file goes into the test's directory, not the machine's /tmp
        env={**os.environ, "TMPDIR": str(tmp), "XDG_RUNTIME_DIR": ""}))
    try:
        out = LineReader(proc.stdout)
        text = await asyncio.to_thread(
            out.wait_for,
            lambda t: t if (JWT_RE.search(t) and re.search(rf"://(127\.0\.0\.1|localhost):{port}\b",
                                                           t)) else None,
            10)
        token = JWT_RE.search(text).group(0)
        assert_unprivileged(proc.pid)
        header, claims, _ = decode_jwt(token)
        assert header.get("alg", "").startswith("HS")
        # the secret is printed too: some word of the output verifies the token
        words = set(re.split(r"[\s'\"=`]+", text))
        assert any(w and verify_hs(token, w, header["alg"]) for w in words), \
            "no printed word verifies the printed token (the secret should be printed)"

        target = types.SimpleNamespace(url=f"ws://127.0.0.1:{port}/ws", port=port)
        ws = await ws_connect(target, token=token)
        for t in ["*", "anything:at:all", "task:*"]:
            f = await subscribe(ws, t)
            assert f["op"] == "subscribed"
        await ws.close()
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    assert rc == 0


def test_dev_refuses_non_loopback_listen(tmp):
    port = free_port()
    cp = run_cli(["serve", "--dev", "--socket", str(tmp / "p.sock"), "--listen", f"0.0.0.0:{port}"],
                 timeout=10)
    assert cp.returncode != 0
    assert cp.stderr.strip(), "no message"


# ---------------------------------------------------------------------------------------------
# environment variables

@async_test
async def test_environment_variables_configure_serve(relay_factory):
    r = relay_factory("--log-level", "debug", flags=False, start=False)
    r.env.update({
        "PROGRESS_RELAY_SOCKET": r.socket_path,
        "PROGRESS_RELAY_JWT_SECRET_FILE": r.secret_file,
        "PROGRESS_RELAY_LISTEN": f"127.0.0.1:{r.port}",
    })
    r.start()
    ws = await ws_connect(r, topics=["env"])
    assert (await recv_json(ws))["op"] == "subscribed"
    assert await r.aemit([b'{"topic":"env","n":1}']) == []
    assert await recv_events(ws, 1) == [{"seq": 1, "topic": "env", "n": 1}]


@async_test
async def test_repeatable_flags_from_environment_are_comma_separated(relay_factory):
    r = relay_factory(start=False, env={"PROGRESS_RELAY_GRANT": "pub:*,user:{sub}:*",
                                        "PROGRESS_RELAY_MAX_SUBSCRIPTIONS": "2"})
    r.start()
    ws = await ws_connect(r, token=r.token(sub="al"))
    await subscribe(ws, "pub:1")
    await subscribe(ws, "user:al:x")
    await send_json(ws, {"op": "subscribe", "topic": "pub:2"})
    f = await recv_json(ws)
    assert f.get("code") == "too_many_subscriptions", f
    ws2 = await ws_connect(r, token=r.token(sub="al"))
    await send_json(ws2, {"op": "subscribe", "topic": "other"})
    assert (await recv_json(ws2)).get("code") == "forbidden"


def test_max_inflight_bytes_from_environment(tmp):
    cp = run_cli(serve_args(tmp, None, "--jwt-secret-file", secret_file(tmp)), timeout=10,
                 env={"PROGRESS_RELAY_MAX_INFLIGHT_BYTES": "100"})
    assert cp.returncode == 2, (cp.returncode, cp.stderr)
    assert "--max-inflight-bytes 100" in cp.stderr.decode()


def test_command_line_flag_wins_over_environment(relay_factory, tmp):
    other_port = free_port()
    other_sock = str(tmp / "env.sock")
    r = relay_factory(start=False, env={
        "PROGRESS_RELAY_LISTEN": f"127.0.0.1:{other_port}",
        "PROGRESS_RELAY_SOCKET": other_sock,
        "PROGRESS_RELAY_JWT_SECRET_FILE": str(tmp / "does-not-exist"),
    })
    r.start()   # waits for /healthz on the flag's port and the flag's socket file
    assert not os.path.exists(other_sock)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", other_port)) != 0, "listening on the env's port"


# ---------------------------------------------------------------------------------------------
# the ingest socket file

@async_test
async def test_stale_socket_file_is_replaced(relay_factory):
    r = relay_factory(start=False)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(r.socket_path)
    s.close()   # the file stays, nobody listens
    # left behind by an earlier run of the relay's own user (another user's would be refused)
    give_to_relay_user(r.socket_path)
    assert os.path.exists(r.socket_path)
    r.start()
    ws = await ws_connect(r, topics=["st"])
    await recv_json(ws)
    assert await r.aemit([b'{"topic":"st"}']) == []
    assert await recv_events(ws, 1) == [{"seq": 1, "topic": "st"}]


@async_test
async def test_second_relay_on_a_live_socket_refuses(relay_factory):
    r1 = relay_factory()
    r2 = relay_factory(start=False)
    r2.socket_path = r1.socket_path
    cp = await asyncio.to_thread(_retry_busy, lambda: subprocess.run(
        r2.command, capture_output=True, timeout=15, env=r2.env))
    assert cp.returncode != 0
    err = cp.stderr.decode()
    assert r1.socket_path in err or re.search(r"in use|already|another|running|live", err, re.I), \
        f"no clear message: {err}"
    # the first relay still owns the socket
    assert os.path.exists(r1.socket_path)
    ws = await ws_connect(r1, topics=["one"])
    await recv_json(ws)
    assert await r1.aemit([b'{"topic":"one"}']) == []
    assert await recv_events(ws, 1) == [{"seq": 1, "topic": "one"}]


def test_socket_path_too_long_is_refused_clearly(relay_factory):
    r = relay_factory(start=False)
    # sun_path holds 108 bytes with its terminating zero: 107 fit, 108 do not.
    for length, fits in ((107, True), (108, False)):
        path = "/tmp/" + "p" * (length - len("/tmp/"))
        assert len(path) == length
        r.socket_path = path
        proc = subprocess.Popen(r.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=r.env)
        try:
            if fits:
                deadline = time.monotonic() + 15
                while not os.path.exists(path):
                    assert proc.poll() is None, proc.stderr.read().decode()
                    assert time.monotonic() < deadline, "the relay did not bind a 107-byte path"
                    time.sleep(0.05)
            else:
                assert proc.wait(15) == 2   # a bad address: status 2, as for every bad flag
                err = proc.stderr.read().decode()
                assert f"--socket {path}: path is too long" in err, err
                assert not os.path.exists(path)
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)
            if os.path.exists(path):
                os.unlink(path)


def test_socket_mode_default_0660(relay):
    assert oct(os.stat(relay.socket_path).st_mode & 0o777) == oct(0o660)


def test_socket_mode_flag(relay_factory):
    r = relay_factory("--socket-mode", "0600")
    assert oct(os.stat(r.socket_path).st_mode & 0o777) == oct(0o600)


# ---------------------------------------------------------------------------------------------
# emit

async def _emit_cli(args, input=None):
    return await asyncio.to_thread(run_cli, ["emit", *args], input=input)


@async_test
async def test_emit_with_fields(relay):
    ws = await ws_connect(relay, topics=["task:42"])
    await recv_json(ws)
    cp = await _emit_cli(["--socket", relay.socket_path, "--topic", "task:42", "--type",
                          "progress", "--field", "progress=60", "--field", "message=hi"])
    assert cp.returncode == 0, cp.stderr
    text = await recv_text(ws)
    assert text.startswith('{"seq":1,')
    ev = json.loads(text)
    assert ev == {"seq": 1, "topic": "task:42", "type": "progress", "progress": 60,
                  "message": "hi"}
    assert type(ev["progress"]) is int


@async_test
async def test_emit_field_values_json_or_string(relay):
    ws = await ws_connect(relay, topics=["f"])
    await recv_json(ws)
    cp = await _emit_cli(["--socket", relay.socket_path, "--topic", "f",
                          "--field", 'data={"a":[1,2]}', "--field", "ok=true",
                          "--field", "x=1.5", "--field", 'quoted="60"', "--field", "none=null",
                          "--field", "words=hello world", "--field", "eq=a=b"])
    assert cp.returncode == 0, cp.stderr
    ev = (await recv_events(ws, 1))[0]
    assert ev == {"seq": 1, "topic": "f", "data": {"a": [1, 2]}, "ok": True, "x": 1.5,
                  "quoted": "60", "none": None, "words": "hello world", "eq": "a=b"}


@async_test
async def test_emit_reads_ndjson_from_stdin(relay):
    ws = await ws_connect(relay, topics=["in"])
    await recv_json(ws)
    lines = [b'{"topic":"in","n":1}', b'{"topic":"in","type":"progress","progress":50}',
             b'{"topic":"in","type":"complete","success":true}']
    cp = await _emit_cli(["--socket", relay.socket_path], input=b"\n".join(lines) + b"\n")
    assert cp.returncode == 0, cp.stderr
    assert await recv_events(ws, 3) == [json.loads(event_text(i + 1, l))
                                        for i, l in enumerate(lines)]
    await expect_nothing(ws, 0.3)


@async_test
async def test_emit_rejected_line_fails_with_the_reason(relay):
    bad = b'{"topic":"in","seq":9}'
    reason = (await relay.aemit([bad]))[0]["error"]
    ws = await ws_connect(relay, topics=["in"])
    await recv_json(ws)
    cp = await _emit_cli(["--socket", relay.socket_path],
                         input=b'{"topic":"in","n":1}\n' + bad + b'\n{"topic":"in","n":3}\n')
    assert cp.returncode != 0
    assert reason in cp.stderr.decode(), (reason, cp.stderr)
    assert [e["n"] for e in await recv_events(ws, 2)] == [1, 3]


@async_test
async def test_emit_topic_with_reserved_field_fails(relay):
    cp = await _emit_cli(["--socket", relay.socket_path, "--topic", "t", "--field", "seq=1"])
    assert cp.returncode != 0
    assert cp.stderr.strip()


def test_emit_to_missing_socket_fails(tmp):
    cp = run_cli(["emit", "--socket", str(tmp / "missing.sock"), "--topic", "t"], timeout=10)
    assert cp.returncode != 0
    assert cp.stderr.strip()


# ---------------------------------------------------------------------------------------------
# token

@async_test
async def test_token_command_mints_an_accepted_token(relay):
    cp = await asyncio.to_thread(run_cli, ["token", "--jwt-secret-file", relay.secret_file,
                                           "--sub", "u", "--topic", "task:*", "--ttl", "1h"])
    assert cp.returncode == 0, cp.stderr
    tok = cp.stdout.decode().strip()
    assert JWT_RE.fullmatch(tok), tok
    header, claims, _ = decode_jwt(tok)
    assert header["alg"] == "HS256"
    assert verify_hs(tok, relay.secret, "HS256"), "not signed with the file's secret " \
                                                  "(one trailing newline stripped)"
    assert claims["sub"] == "u" and claims["topics"] == ["task:*"]
    assert abs(claims["exp"] - (time.time() + 3600)) < 10
    ws = await ws_connect(relay, token=tok)
    f = await subscribe(ws, "task:1")
    assert f["op"] == "subscribed"
    await send_json(ws, {"op": "subscribe", "topic": "other"})
    assert (await recv_json(ws)).get("code") == "forbidden"


@pytest.mark.parametrize("ttl, seconds", [("45", 45), ("90s", 90), ("30m", 1800), ("2h", 7200),
                                          ("1d", 86400)])
def test_token_ttl_units(tmp, ttl, seconds):
    f = secret_file(tmp)
    cp = run_cli(["token", "--jwt-secret-file", f, "--sub", "x", "--ttl", ttl])
    assert cp.returncode == 0, cp.stderr
    claims = decode_jwt(cp.stdout.decode().strip())[1]
    assert abs(claims["exp"] - (time.time() + seconds)) < 10


def test_token_repeatable_topic(tmp):
    f = secret_file(tmp, "k" * 32)
    cp = run_cli(["token", "--jwt-secret-file", f, "--sub", "x", "--topic", "a", "--topic", "b:*"])
    assert cp.returncode == 0, cp.stderr
    tok = cp.stdout.decode().strip()
    assert verify_hs(tok, "k" * 32)
    assert decode_jwt(tok)[1]["topics"] == ["a", "b:*"]
