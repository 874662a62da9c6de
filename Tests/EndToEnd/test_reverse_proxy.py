"""The reverse-proxy examples (issue 16): examples/nginx/progress-relay.conf, run by Debian's
nginx in front of a relay, and examples/caddy/Caddyfile, validated and run by Debian's caddy.

nginx runs the example file byte for byte but for three substitutions: the listen address
(`listen 80;`), the relay's port (`127.0.0.1:8765`) and the access log's path."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse

import pytest

import nginxlib
import relaylib
from relaylib import async_test, recv_events, recv_json, stats_number, wait_until, ws_connect

NGINX_EXAMPLE = relaylib.REPO / "examples" / "nginx" / "progress-relay.conf"
CADDY_EXAMPLE = relaylib.REPO / "examples" / "caddy" / "Caddyfile"
EXAMPLE_LISTEN = "listen 80;"
EXAMPLE_UPSTREAM = "127.0.0.1:8765"
EXAMPLE_NGINX_LOG = "/var/log/nginx/progress-relay.access.log"
EXAMPLE_CADDY_LOG = "/var/log/caddy/progress-relay.access.log"
EXAMPLE_SITE = "relay.example.com {"

needs_nginx = pytest.mark.skipif(not nginxlib.have_nginx(), reason=nginxlib.SKIP_REASON)
CADDY = shutil.which("caddy") or "/usr/bin/caddy"
needs_caddy = pytest.mark.skipif(not os.access(CADDY, os.X_OK),
                                 reason="needs Debian's caddy (.ci/run installs it)")


class ExampleNginx(nginxlib.Nginx):
    """nginx running examples/nginx/progress-relay.conf in front of `relay_port`."""

    def __init__(self, relay_port: int):
        super().__init__()
        self.access_log = self.dir / "access.log"
        text = NGINX_EXAMPLE.read_text()
        for needle, count in ((EXAMPLE_LISTEN, 1), (EXAMPLE_NGINX_LOG, 1)):
            assert text.count(needle) == count, needle
        assert text.count(EXAMPLE_UPSTREAM) >= 4, "every location proxies to the relay's default address"
        text = text.replace(EXAMPLE_LISTEN, f"listen 127.0.0.1:{self.port};")
        text = text.replace(EXAMPLE_UPSTREAM, f"127.0.0.1:{relay_port}")
        text = text.replace(EXAMPLE_NGINX_LOG, str(self.access_log))
        self.configure(text)

    def logs(self) -> dict[str, str]:
        return self.read_logs(self.access_log, self.error_log)


def get(port: int, path: str, headers: dict | None = None, *, source: str | None = None,
        timeout: float = 10) -> tuple[int, dict, bytes, float]:
    """One GET to 127.0.0.1:port (from `source`, a loopback address, if given):
    (status, headers, body, seconds until the whole answer was read)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout,
                                      source_address=(source, 0) if source else None)
    start = time.monotonic()
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body, time.monotonic() - start
    finally:
        conn.close()


def bearer(relay, topics=("job:*",), sub: str = "u1") -> dict:
    return {"Authorization": "Bearer " + relay.token(sub=sub, topics=list(topics))}


class InThread:
    """Run fn() on a thread; .join() returns its result or raises what it raised."""

    def __init__(self, fn):
        self.result = self.error = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn):
        try:
            self.result = fn()
        except BaseException as e:  # noqa: BLE001 - handed to join()
            self.error = e

    def join(self, timeout: float = 30):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the request did not end"
        if self.error:
            raise self.error
        return self.result


@pytest.fixture
def proxied(relay_factory):
    """make(*relay_args) -> (relay, nginx): a relay, and nginx with the example in front of it."""
    started: list[ExampleNginx] = []

    def make(*relay_args):
        relay = relay_factory(*relay_args)
        nginx = ExampleNginx(relay.port)
        started.append(nginx)
        nginx.start()
        return relay, nginx

    yield make
    for nginx in started:
        nginx.cleanup()


# ---------------------------------------------------------------------------------------------
# nginx


@needs_nginx
def test_nginx_example_passes_nginx_t():
    nginx = ExampleNginx(relaylib.free_port())
    try:
        out = subprocess.run([nginxlib.NGINX, "-t", "-p", str(nginx.dir), "-e", str(nginx.error_log),
                              "-c", str(nginx.conf)], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert "warn" not in out.stderr, out.stderr
    finally:
        nginx.cleanup()


@needs_nginx
@async_test(timeout=60)
async def test_websocket_and_healthz_through_nginx(proxied):
    relay, nginx = proxied()
    status, _, body, _ = get(nginx.port, "/healthz")
    assert status == 200 and body.strip() == b"ok", (status, body)
    # subprotocol token, as browsers send it
    ws = await ws_connect(nginxlib.Through(relay, nginx.port), token=relay.token(topics=["job:*"]),
                          via="subprotocol", topics=["job:1"])
    assert ws.subprotocol == "progress-relay.v1"
    frame = await recv_json(ws)
    assert frame["op"] == "subscribed" and frame["topic"] == "job:1", frame
    relay.emit_lines([{"topic": "job:1", "type": "progress", "progress": 10},
                      {"topic": "job:1", "type": "complete", "success": True}])
    events = await recv_events(ws, 2)
    assert [(e["seq"], e["type"]) for e in events] == [(1, "progress"), (2, "complete")], events
    # the relay's pings reach the client through nginx, and its pongs get back
    await ws.ping()
    await ws.close()
    nginx.stop()
    log = nginx.logs()["access.log"]
    assert "GET /ws HTTP/1.1\" 101 " in log, log


@needs_nginx
@async_test(timeout=60)
async def test_query_token_stays_out_of_the_access_log(proxied):
    """`?token=` on /ws and on /topics/...: both work through nginx, and the example's access log
    has the paths but neither the token nor any query."""
    relay, nginx = proxied()
    ws_token = relay.token(sub="ws-user", topics=["job:*"])
    ws = await ws_connect(nginxlib.Through(relay, nginx.port), token=ws_token, topics=["job:q"])
    frame = await recv_json(ws)
    assert frame["op"] == "subscribed", frame
    relay.emit_lines([{"topic": "job:q", "type": "progress", "progress": 50}])
    assert (await recv_events(ws, 1))[0]["progress"] == 50
    await ws.close()
    poll_token = relay.token(sub="poll-user", topics=["job:*"])
    status, _, body, _ = get(nginx.port, "/topics/job:q/events?" + urllib.parse.urlencode(
        {"since": 0, "token": poll_token}))
    assert status == 200, body
    assert json.loads(body)["events"][0]["progress"] == 50
    time.sleep(0.3)  # nginx writes the line when the proxied connection ends
    nginx.stop()
    log = nginx.logs()["access.log"]
    assert "\"GET /ws HTTP/1.1\" 101 " in log, log
    assert "\"GET /topics/job:q/events HTTP/1.1\" 200 " in log, log
    for token in (ws_token, poll_token):
        assert token not in log and token.split(".")[1] not in log
    assert "?" not in log and "token" not in log, log


@needs_nginx
def test_long_poll_answered_when_the_event_comes(proxied):
    """A poll with wait=3 is answered by an event emitted after 1 s, at about 1 s: nginx holds
    the poll for the relay and passes its answer on at once."""
    relay, nginx = proxied()
    relay.emit_lines([{"topic": "job:lp", "type": "progress", "progress": 1}])
    first = json.loads(get(nginx.port, "/topics/job:lp/events", bearer(relay))[2])
    epoch, seq = first["epoch"], first["seq"]
    path = f"/topics/job:lp/events?epoch={urllib.parse.quote(epoch)}&since={seq}&wait=3"
    poll = InThread(lambda: get(nginx.port, path, bearer(relay)))
    time.sleep(1)
    relay.emit_lines([{"topic": "job:lp", "type": "progress", "progress": 2}])
    status, headers, body, took = poll.join()
    assert status == 200, body
    answer = json.loads(body)
    assert [e["progress"] for e in answer["events"]] == [2], answer
    assert 0.9 <= took < 2.5, took
    # and a poll nothing answers waits its 3 s through nginx (under the 75 s read timeout)
    status, _, body, took = get(nginx.port, f"/topics/job:lp/events?epoch={urllib.parse.quote(epoch)}"
                                f"&since={seq + 1}&wait=3", bearer(relay))
    assert status == 200 and json.loads(body)["events"] == [], body
    assert 2.9 <= took < 5, took


@needs_nginx
def test_per_address_limit_counts_the_forwarded_client(proxied):
    """nginx sets X-Forwarded-For to the client's address; the relay, trusting nginx's address
    (127.0.0.1), counts --max-connections-per-ip per client. The clients come from other loopback
    addresses (127.0.0.5, 127.0.0.6) so that the forwarded address is not itself trusted. A
    client's own X-Forwarded-For is replaced, so it cannot pick another budget."""
    relay, nginx = proxied("--trusted-proxy", "127.0.0.1", "--max-connections-per-ip", "1")
    a, b = "127.0.0.5", "127.0.0.6"
    hold = InThread(lambda: get(nginx.port, "/topics/job:hold/events?wait=20", bearer(relay), source=a,
                                timeout=30))
    wait_until(lambda: stats_number(relay.stats(), "longpoll_waiters") == 1, 10, what="the poll waits")
    # the same client again: over its budget (503 from the relay, passed on by nginx)
    status, headers, _, _ = get(nginx.port, "/healthz", source=a)
    assert status == 503 and headers.get("retry-after") == "1", (status, headers)
    status, _, _, _ = get(nginx.port, "/healthz", {"X-Forwarded-For": "203.0.113.9"}, source=a)
    assert status == 503, "a client-sent X-Forwarded-For must not pick another budget"
    # another client has its own
    status, _, body, _ = get(nginx.port, "/healthz", source=b)
    assert status == 200, (status, body)
    relay.emit_lines([{"topic": "job:hold", "type": "progress", "progress": 1}])
    status, _, body, _ = hold.join()
    assert status == 200, body
    wait_until(lambda: get(nginx.port, "/healthz", source=a)[0] == 200, 5, what="a's budget is back")
    nginx.stop()
    log = nginx.logs()["access.log"]
    assert any(line.startswith(a + " ") and "\"GET /healthz HTTP/1.1\" 503 " in line for line in log.splitlines()), log
    assert any(line.startswith(b + " ") for line in log.splitlines()), log


class StreamReader:
    """GET a streamed answer through http.client (so nginx's chunked encoding is undone) and read
    it as it comes."""

    def __init__(self, port: int, path: str, headers: dict):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.conn.request("GET", path, headers={"Accept": "text/event-stream", **headers})
        self.resp = self.conn.getresponse()
        self.buf = b""

    def read_until(self, needle: bytes, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while needle not in self.buf:
            left = deadline - time.monotonic()
            assert left > 0, f"{needle!r} did not come within {timeout} s; got {self.buf[-500:]!r}"
            self.conn.sock.settimeout(left)
            try:
                data = self.resp.read1(65536)
            except socket.timeout:
                continue
            assert data, f"the stream ended before {needle!r}; got {self.buf[-500:]!r}"
            self.buf += data
        return self.buf

    def close(self):
        self.conn.close()


@needs_nginx
def test_sse_through_nginx_delivers_each_event_as_it_happens(proxied):
    relay, nginx = proxied()
    stream = StreamReader(nginx.port, "/sse?topic=job:s", bearer(relay))
    try:
        if stream.resp.status == 404:
            pytest.skip("SSE route not present")
        assert stream.resp.status == 200, stream.resp.read()
        assert stream.resp.getheader("X-Accel-Buffering") is None, "nginx consumes it"
        assert stream.resp.getheader("Content-Type", "").startswith("text/event-stream")
        stream.read_until(b"event: subscribed", 5)
        for n in (1, 2, 3):
            relay.emit_lines([{"topic": "job:s", "type": "progress", "progress": n * 10}])
            # each event arrives while the stream stays open, within a second of its emission
            stream.read_until(f'"progress":{n * 10}'.encode(), 1.0)
            assert not stream.resp.isclosed()
            time.sleep(0.3)
        assert stream.buf.count(b"\ndata: ") + stream.buf.startswith(b"data: ") >= 3
    finally:
        stream.close()


# ---------------------------------------------------------------------------------------------
# Caddy


@needs_caddy
def test_caddyfile_validates():
    out = subprocess.run([CADDY, "validate", "--config", str(CADDY_EXAMPLE), "--adapter", "caddyfile"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "XDG_DATA_HOME": "/tmp", "XDG_CONFIG_HOME": "/tmp"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Valid configuration" in out.stdout + out.stderr


@needs_caddy
@async_test(timeout=90)
async def test_caddy_websocket_round_trip_and_no_query_in_its_log(relay_factory):
    """The Caddyfile on loopback (plain http on a free port instead of the site's name, the admin
    endpoint off, the relay's port and the log's path changed): a WebSocket subscriber gets an
    event; then the access log holds /ws but neither the `?token=` nor the subprotocol token."""
    relay = relay_factory()
    work = relaylib.short_tmpdir("caddy-")
    port = relaylib.free_port()
    log_path = work / "access.log"
    text = CADDY_EXAMPLE.read_text()
    assert text.count(EXAMPLE_SITE) == 1 and text.count(EXAMPLE_CADDY_LOG) == 1
    text = text.replace(EXAMPLE_SITE, f"http://127.0.0.1:{port} {{")
    text = text.replace(EXAMPLE_UPSTREAM, f"127.0.0.1:{relay.port}")
    text = text.replace(EXAMPLE_CADDY_LOG, str(log_path))
    conf = work / "Caddyfile"
    conf.write_text("{\n\tadmin off\n\tauto_https off\n}\n\n" + text)
    env = {**os.environ, "HOME": str(work), "XDG_DATA_HOME": str(work), "XDG_CONFIG_HOME": str(work)}
    proc = subprocess.Popen([CADDY, "run", "--config", str(conf), "--adapter", "caddyfile"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=open(work / "stderr", "wb"), env=env)
    try:
        def up():
            assert proc.poll() is None, (work / "stderr").read_text()
            try:
                return get(port, "/healthz", timeout=1)[0] == 200
            except OSError:
                return False
        wait_until(up, 20, interval=0.1, what="caddy answers")
        through = nginxlib.Through(relay, port)
        sub_token = relay.token(sub="caddy-sub", topics=["job:*"])
        query_token = relay.token(sub="caddy-query", topics=["job:*"])
        ws = await ws_connect(through, token=sub_token, via="subprotocol", topics=["job:c"])
        assert ws.subprotocol == "progress-relay.v1"
        ws2 = await ws_connect(through, token=query_token, topics=["job:c"])
        for w in (ws, ws2):
            assert (await recv_json(w))["op"] == "subscribed"
        relay.emit_lines([{"topic": "job:c", "type": "progress", "progress": 42}])
        for w in (ws, ws2):
            assert (await recv_events(w, 1))[0]["progress"] == 42
        await ws.close()
        await ws2.close()
        # SSE through Caddy, when the relay has the route: each event as it happens
        stream = StreamReader(port, "/sse?topic=job:c", bearer(relay))
        try:
            if stream.resp.status != 404:
                assert stream.resp.status == 200, stream.resp.read()
                stream.read_until(b"event: subscribed", 5)
                relay.emit_lines([{"topic": "job:c", "type": "progress", "progress": 43}])
                stream.read_until(b'"progress":43', 1.0)
        finally:
            stream.close()
        wait_until(lambda: log_path.exists() and log_path.read_text().count('"uri":"/ws"') >= 2, 10,
                   what="caddy logs both connections")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    log = log_path.read_text()
    try:
        for token in (sub_token, query_token):
            assert token not in log and token.split(".")[1] not in log, log
        assert "token=" not in log and "bearer." not in log, log
    finally:
        shutil.rmtree(work, ignore_errors=True)
