"""Issue 15, the HTTP/WebSocket edge under abuse: --max-connections, --max-connections-per-ip with
--trusted-proxy, --handshake-timeout and the keep-alive idle close, header limits, and the
WebSocket handshake checks. Raw sockets throughout; every test also checks that a well-behaved
subscriber on the same relay keeps receiving events, and that the relay serves again once the
offending connections are gone."""

from __future__ import annotations

import base64
import os
import socket
import time

import pytest

from relaylib import RawWS, wait_until

WS_KEY = base64.b64encode(b"0123456789abcdef").decode()


# ---------------------------------------------------------------------------------------------
# helpers

def connect(relay, timeout: float = 5.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", relay.port), timeout=timeout)
    return s


def request_bytes(path: str = "/healthz", headers: dict | list | None = None,
                  method: str = "GET") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    items = headers.items() if isinstance(headers, dict) else (headers or [])
    lines += [f"{k}: {v}" for k, v in items]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def ws_headers(**extra) -> dict:
    h = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": WS_KEY,
         "Sec-WebSocket-Version": "13"}
    h.update(extra)
    return h


def read_response(s: socket.socket, timeout: float = 5.0):
    """(status, headers with lower-case names, body) of one response; the body per
    Content-Length (none for 101)."""
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\r\n\r\n" not in buf:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        b = s.recv(65536)
        if not b:
            raise AssertionError(f"EOF before a complete response head: {buf!r}")
        buf += b
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    n = 0 if status == 101 else int(headers.get("content-length", "0"))
    while len(rest) < n:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        b = s.recv(65536)
        if not b:
            break
        rest += b
    return status, headers, rest[:n]


def exchange(relay, data: bytes, timeout: float = 5.0):
    s = connect(relay, timeout)
    try:
        s.sendall(data)
        return read_response(s, timeout)
    finally:
        s.close()


def closed_by_relay(s: socket.socket, timeout: float = 5.0) -> bytes:
    """Reads until the relay closes the connection; returns what it sent. Fails if it stays open."""
    got = b""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"the relay did not close the connection within {timeout}s: {got!r}")
        s.settimeout(left)
        try:
            b = s.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return got
        except socket.timeout:
            continue
        if not b:
            return got
        got += b


def assert_refused_503(status, headers, body=b""):
    assert status == 503, (status, headers, body)
    assert headers.get("retry-after") == "1", headers
    assert headers.get("connection", "").lower() == "close", headers


class Subscriber:
    """A well-behaved WebSocket subscriber of one topic; `check()` emits an event through the
    ingest socket and insists on receiving it."""

    def __init__(self, relay, topic: str = "edge", headers: dict | None = None):
        self.relay, self.topic, self.n = relay, topic, 0
        self.ws = RawWS.for_relay(relay, topics=[topic], headers=headers)
        assert self.ws.status == 101, (self.ws.status, self.ws.headers)
        assert self.ws.recv_json()["op"] == "subscribed"

    def check(self):
        self.n += 1
        assert self.relay.emit_lines([{"topic": self.topic, "n": self.n}]) == []
        f = self.ws.recv_json(5)
        assert f.get("n") == self.n, f

    def close(self):
        self.ws.close()


def serves_again(relay, timeout: float = 8.0):
    """A plain request and a WebSocket handshake are served (retried while the relay notices the
    closed connections)."""
    def healthy():
        try:
            status, _, _ = exchange(relay, request_bytes("/healthz"), timeout=2)
            return status == 200
        except OSError:
            return False
    def upgrades():
        ws = RawWS.for_relay(relay)
        ws.close()
        return ws.status == 101
    wait_until(healthy, timeout, interval=0.1, what="GET /healthz answered 200 again")
    # (the relay notices the close of the request just made when it reads its end-of-file)
    wait_until(upgrades, timeout, interval=0.1, what="a WebSocket handshake answered 101 again")


# ---------------------------------------------------------------------------------------------
# --max-connections

def test_over_max_connections_is_503_before_any_upgrade(relay_factory):
    relay = relay_factory("--max-connections", "5")
    sub = Subscriber(relay)
    idle = [connect(relay) for _ in range(4)]   # 5 held with the subscriber
    try:
        time.sleep(0.2)
        status, headers, body = exchange(relay, request_bytes("/healthz"))
        assert_refused_503(status, headers, body)
        # a WebSocket handshake is refused the same way, not upgraded
        s = connect(relay)
        s.sendall(request_bytes("/ws?token=" + relay.token(topics=["*"]), ws_headers()))
        status, headers, _ = read_response(s)
        assert_refused_503(status, headers)
        closed_by_relay(s)
        s.close()
        sub.check()
    finally:
        for s in idle:
            s.close()
    serves_again(relay)
    sub.check()
    text = relay.metrics()
    assert 'progress_relay_http_refused_total{reason="max_connections"}' in text, text
    assert "progress_relay_http_connections" in text


def test_connections_are_counted_until_they_close(relay_factory):
    relay = relay_factory("--max-connections", "3")
    sub = Subscriber(relay)
    a, b = Subscriber(relay, "a"), Subscriber(relay, "b")
    status, headers, _ = exchange(relay, request_bytes("/healthz"))
    assert_refused_503(status, headers)
    b.close()
    serves_again(relay)   # one slot free again: the plain request and a WebSocket each fit
    sub.check()
    a.check()


# ---------------------------------------------------------------------------------------------
# --max-connections-per-ip and --trusted-proxy

def test_per_address_limit_when_loopback_is_not_trusted(relay_factory):
    relay = relay_factory("--max-connections-per-ip", "3", "--trusted-proxy", "10.0.0.0/8")
    sub = Subscriber(relay)
    held = [Subscriber(relay, "a"), Subscriber(relay, "b")]      # 3 from 127.0.0.1
    status, headers, _ = exchange(relay, request_bytes("/healthz"))
    assert_refused_503(status, headers)
    s = connect(relay)
    s.sendall(request_bytes("/ws?token=" + relay.token(topics=["*"]), ws_headers()))
    status, headers, _ = read_response(s)
    assert_refused_503(status, headers)
    closed_by_relay(s)
    s.close()
    # a forwarding header from an untrusted peer changes nothing
    status, headers, _ = exchange(relay, request_bytes("/healthz", {"X-Forwarded-For": "198.51.100.1"}))
    assert_refused_503(status, headers)
    sub.check()
    held[0].close()
    serves_again(relay)
    sub.check()
    assert 'progress_relay_http_refused_total{reason="max_connections_per_ip"}' in relay.metrics()


def test_forwarded_addresses_from_a_trusted_proxy_have_their_own_budgets(relay_factory):
    relay = relay_factory("--max-connections-per-ip", "2")   # loopback trusted by default
    sub = Subscriber(relay)   # no forwarding header: not limited per address
    first = [Subscriber(relay, "x", {"X-Forwarded-For": "203.0.113.7"}),
             Subscriber(relay, "y", {"X-Forwarded-For": "198.51.100.1, 203.0.113.7"})]
    # 203.0.113.7 (the rightmost untrusted hop) has used its 2
    for header in [{"X-Forwarded-For": "203.0.113.7"},
                   {"X-Forwarded-For": "192.0.2.1, 203.0.113.7, 127.0.0.1"},
                   {"Forwarded": 'for=192.0.2.1, for="203.0.113.7:4711";proto=http'}]:
        status, headers, _ = exchange(relay, request_bytes("/healthz", header))
        assert_refused_503(status, headers)
    # another forwarded address has a budget of its own
    other = [Subscriber(relay, "z", {"X-Forwarded-For": "203.0.113.8"}),
             Subscriber(relay, "w", {"Forwarded": 'for="[2001:db8::8]:443"'})]
    status, _, _ = exchange(relay, request_bytes("/healthz", {"X-Forwarded-For": "203.0.113.8"}))
    assert status == 200
    # the trusted peer itself, without a forwarding header, is not limited per address
    plain = [Subscriber(relay, f"p{i}") for i in range(4)]
    sub.check()
    for w in plain + other:
        w.check()
    first[0].close()
    wait_until(lambda: exchange(relay, request_bytes(
        "/healthz", {"X-Forwarded-For": "203.0.113.7"}))[0] == 200, 8, interval=0.1,
        what="203.0.113.7 served again once one of its connections closed")
    sub.check()


# ---------------------------------------------------------------------------------------------
# --handshake-timeout and the keep-alive idle close

def test_silent_connection_is_closed_after_the_handshake_timeout(relay_factory):
    relay = relay_factory("--handshake-timeout", "1")
    sub = Subscriber(relay)
    s = connect(relay)
    began = time.monotonic()
    got = closed_by_relay(s, timeout=5)
    took = time.monotonic() - began
    assert got == b"", got   # nothing was asked: no answer
    assert 0.8 <= took <= 3, took
    s.close()
    sub.check()   # the subscriber, older than 1 s, is not timed out
    serves_again(relay)


def test_started_request_gets_408_after_the_handshake_timeout(relay_factory):
    relay = relay_factory("--handshake-timeout", "1")
    sub = Subscriber(relay)
    s = connect(relay)
    began = time.monotonic()
    s.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")   # never finished
    status, headers, _ = read_response(s, timeout=5)
    took = time.monotonic() - began
    assert status == 408, (status, headers)
    assert headers.get("connection", "").lower() == "close"
    assert 0.8 <= took <= 3, took
    closed_by_relay(s)
    s.close()
    # a slow trickle does not extend it
    s = connect(relay)
    began = time.monotonic()
    status = None
    for ch in b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 40:
        try:
            s.sendall(bytes([ch]))
        except OSError:
            break
        time.sleep(0.05)
        if time.monotonic() - began > 4:
            break
    status, _, _ = read_response(s, timeout=5)
    assert status == 408
    assert time.monotonic() - began <= 4.5
    s.close()
    sub.check()
    serves_again(relay)


def test_idle_keep_alive_connection_is_closed_after_5s(relay_factory):
    relay = relay_factory("--handshake-timeout", "1")
    s = connect(relay)
    s.sendall(request_bytes("/healthz"))
    status, headers, body = read_response(s)
    assert status == 200 and body == b"ok"
    # a second request on the same connection after a pause within the idle time is served
    time.sleep(1.5)
    s.sendall(request_bytes("/healthz"))
    status, _, _ = read_response(s)
    assert status == 200
    began = time.monotonic()
    got = closed_by_relay(s, timeout=10)
    took = time.monotonic() - began
    assert got == b"", got
    assert 4 <= took <= 8, took
    s.close()


# ---------------------------------------------------------------------------------------------
# header limits

@pytest.mark.parametrize("what, data, status", [
    ("request line over 8 KiB", request_bytes("/healthz?" + "a" * 9000), 414),
    ("one header over 8 KiB", request_bytes("/healthz", {"X-Big": "b" * 9000}), 431),
    ("headers over 32 KiB in all", request_bytes("/healthz", [(f"X-H{i}", "c" * 7000) for i in range(5)]), 431),
    ("101 headers", request_bytes("/healthz", [(f"X-H{i}", "v") for i in range(101)]), 431),
], ids=["uri", "one-header", "all-headers", "header-count"])
def test_header_limits(relay_factory, what, data, status):
    relay = relay_factory()
    sub = Subscriber(relay)
    s = connect(relay)
    try:
        s.sendall(data)
    except OSError:
        pass   # the relay may answer and close before it has read everything
    got, headers, body = read_response(s)
    assert got == status, (what, got, headers, body)
    assert headers.get("connection", "").lower() == "close"
    closed_by_relay(s)
    s.close()
    sub.check()
    serves_again(relay)


def test_requests_within_the_header_limits_are_served(relay_factory):
    relay = relay_factory()
    assert exchange(relay, request_bytes("/healthz?" + "a" * 7000))[0] == 200
    assert exchange(relay, request_bytes("/healthz", {"X-Big": "b" * 8000}))[0] == 200
    assert exchange(relay, request_bytes("/healthz", [(f"X-H{i}", "v") for i in range(90)]))[0] == 200
    assert exchange(relay, request_bytes("/healthz", [(f"X-H{i}", "c" * 6000) for i in range(4)]))[0] == 200


def test_a_1mib_header_is_refused_before_much_of_it_is_read(relay_factory):
    relay = relay_factory()
    sub = Subscriber(relay)
    s = connect(relay)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Huge: ")
    sent = 0
    chunk = b"h" * 2048
    answer = b""
    s.settimeout(0.05)
    while sent < 1024 * 1024:
        try:
            s.sendall(chunk)
        except OSError:
            break   # closed by the relay
        sent += len(chunk)
        try:
            b = s.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            break
        answer += b
        break   # an answer (or EOF) arrived
    assert sent <= 40 * 1024, f"still reading after {sent} bytes of one header"
    if answer:
        s.settimeout(5)
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    s.close()
    sub.check()
    serves_again(relay)


# ---------------------------------------------------------------------------------------------
# WebSocket handshake checks

@pytest.mark.parametrize("version", ["8", "12", "14", "13, 8"])
def test_unsupported_websocket_version_is_426_naming_13(relay, version):
    sub = Subscriber(relay)
    status, headers, _ = exchange(relay, request_bytes(
        "/ws?token=" + relay.token(topics=["*"]), ws_headers(**{"Sec-WebSocket-Version": version})))
    assert status == 426, (status, headers)
    assert headers.get("sec-websocket-version") == "13", headers
    sub.check()


@pytest.mark.parametrize("key", [
    "abc", base64.b64encode(os.urandom(15)).decode(), base64.b64encode(os.urandom(17)).decode(),
    "!" * 24, base64.b64encode(os.urandom(16)).decode().rstrip("="),
], ids=["short", "15-bytes", "17-bytes", "not-base64", "unpadded"])
def test_bad_websocket_key_is_400(relay, key):
    sub = Subscriber(relay)
    status, headers, body = exchange(relay, request_bytes(
        "/ws?token=" + relay.token(topics=["*"]), ws_headers(**{"Sec-WebSocket-Key": key})))
    assert status == 400, (status, headers, body)
    sub.check()
    serves_again(relay)


# ---------------------------------------------------------------------------------------------
# the flags

@pytest.mark.parametrize("args, flag", [
    (["--max-connections", "0"], "--max-connections"),
    (["--max-connections-per-ip", "0"], "--max-connections-per-ip"),
    (["--trusted-proxy", "10.0.0.0/33"], "--trusted-proxy"),
    (["--trusted-proxy", "proxy.example"], "--trusted-proxy"),
    (["--handshake-timeout", "0"], "--handshake-timeout"),
    (["--handshake-timeout", "-1"], "--handshake-timeout"),
])
def test_bad_edge_flags_exit_2_naming_the_flag(relay_factory, args, flag):
    r = relay_factory(*args, start=False)
    done = r.run_to_exit()
    assert done.returncode == 2, done
    assert flag in done.stderr.decode(), done.stderr


def test_edge_flags_from_the_environment(relay_factory):
    r = relay_factory(start=False, env={"PROGRESS_RELAY_MAX_CONNECTIONS_PER_IP": "0"})
    done = r.run_to_exit()
    assert done.returncode == 2
    assert "PROGRESS_RELAY_MAX_CONNECTIONS_PER_IP" in done.stderr.decode(), done.stderr
    relay = relay_factory(env={"PROGRESS_RELAY_MAX_CONNECTIONS": "2",
                               "PROGRESS_RELAY_TRUSTED_PROXY": "10.0.0.0/8,fd00::/8"})
    sub = Subscriber(relay)
    held = connect(relay)
    time.sleep(0.2)
    status, headers, _ = exchange(relay, request_bytes("/healthz"))
    assert_refused_503(status, headers)
    held.close()
    sub.check()
