"""Issue 16 section 3: the client's `transport` option and its server-sent events fallback.

With `transport: 'auto'` (the default) the client tries the WebSocket and, after two handshakes
failing without ever opening while the host still answers HTTP, switches to SSE (`GET /sse`, one
EventSource per subscription, each with a one-time ticket and the client's own resume point).
The proxy here is Debian's nginx refusing upgrades on /ws (`return 403`) and proxying /sse
unbuffered, as examples/nginx/progress-relay.conf does. `transport: 'sse'` needs no proxy."""

from __future__ import annotations

import time
import urllib.parse

import pytest

import nginxlib
from conftest import CLIENT_DIR
from jshelpers import Emitter, connection_text, events_of, harness_log, open_harness, states, wait_js, wait_row


def progress(topic: str, i: int, n: int) -> dict:
    return {"topic": topic, "type": "progress", "progress": round(100 * i / n, 2), "current": i,
            "total": n, "message": f"step {i}/{n}", "i": i}


def assert_exactly_once(events: list[dict], n: int, sub: str):
    got = [e["event"]["i"] for e in events]
    assert got == list(range(1, n + 1)), f"{sub}: expected i = 1..{n} once each, in order; got {got}"
    seqs = [e["event"]["seq"] for e in events]
    assert seqs == list(range(1, n + 1)), f"{sub}: seqs {seqs}"


@pytest.fixture
def no_upgrade_proxy():
    """make(relay) -> nginxlib.Nginx in front of `relay`: /ws answers 403 (no upgrade reaches the
    relay), /sse is proxied unbuffered, everything else (/ticket, /healthz, /) as it is."""
    if not nginxlib.have_nginx():
        pytest.fail(nginxlib.SKIP_REASON)
    made: list[nginxlib.Nginx] = []

    def make(relay, static: bool = False) -> nginxlib.Nginx:
        """static: nginx serves `/` (live.html) and `/progress-relay.js` from clients/js itself,
        so that the page runs the client under test whatever the relay binary embeds."""
        ngx = nginxlib.Nginx()
        files = ""
        if static:
            files = f"""
        location = / {{ root {CLIENT_DIR}; try_files /live.html =404; types {{ }} default_type text/html; }}
        location = /progress-relay.js {{ root {CLIENT_DIR}; types {{ }} default_type text/javascript; }}"""
        made.append(ngx)
        upstream = f"http://127.0.0.1:{relay.port}"
        ngx.configure(f"""
    access_log {ngx.dir}/access.log;
    server {{
        listen 127.0.0.1:{ngx.port};
        proxy_http_version 1.1;
        proxy_set_header Host $host;
        location = /ws {{ return 403; }}
        location = /sse {{
            proxy_pass {upstream};
            proxy_buffering off;
            proxy_cache off;
            gzip off;
            proxy_read_timeout 75s;
        }}
        location / {{ proxy_pass {upstream}; }}{files}
    }}""")
        return ngx.start()

    yield make
    for ngx in made:
        ngx.cleanup()


def streams(browser) -> list[str]:
    return [s["url"] for s in browser.execute_script("return window.harness.log.streams")]


def opened_websockets(browser) -> list[dict]:
    return browser.execute_script("return window.harness.log.opened")


# ---------------------------------------------------------------------------------------------

def test_auto_falls_back_to_sse_behind_a_proxy_that_refuses_upgrades(browser, page_server, relay_factory,
                                                                     no_upgrade_proxy):
    relay = relay_factory()
    ngx = no_upgrade_proxy(relay)
    token = relay.token(topics=["job:*"])
    open_harness(browser, page_server)
    browser.execute_script(
        "return window.harness.start(arguments[0], {token: arguments[1], topics: ['job:1', 'job:*'],"
        " options: {minDelay: 100}})", f"ws://127.0.0.1:{ngx.port}/ws", token)
    wait_js(browser, "window.harness.log.statuses.filter(s => s.status === 'subscribed').length === 2", 15,
            "both subscriptions over SSE")
    assert browser.execute_script("return window.harness.relay.transport") == "sse"
    log = harness_log(browser)
    assert [t["transport"] for t in log["transports"]] == ["sse"], log["transports"]
    assert "WebSocket" in log["transports"][0]["reason"]
    # two failed handshakes, none opened, then one stream per subscription, each with a ticket
    assert len(opened_websockets(browser)) == 2 and not any(o["selected"] for o in opened_websockets(browser))
    urls = streams(browser)
    assert len(urls) == 2, urls
    for url in urls:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
        assert url.startswith(f"http://127.0.0.1:{ngx.port}/sse?"), url
        assert query["ticket"] and "token" not in query and token.split(".")[1] not in url, url
    assert sorted(urllib.parse.parse_qs(urllib.parse.urlsplit(u).query)["topic"][0] for u in urls) == ["job:*", "job:1"]

    n = 100
    relay.emit_lines([progress("job:1", i, n) for i in range(1, n + 1)]
                     + [{"topic": "job:2", "type": "complete", "success": True, "message": "done"}])
    wait_js(browser, f"window.harness.log.events.length >= {2 * n + 1}", 15, "every event")
    time.sleep(0.3)
    exact = events_of(browser, "job:1")
    pattern = [e for e in events_of(browser, "job:*") if e["event"]["topic"] == "job:1"]
    assert_exactly_once(exact, n, "job:1")
    assert_exactly_once(pattern, n, "job:*")
    assert not any(e["info"]["gap"] for e in exact + pattern)
    other = [e["event"] for e in events_of(browser, "job:*") if e["event"]["topic"] == "job:2"]
    assert other == [{"seq": 1, "topic": "job:2", "type": "complete", "success": True, "message": "done"}]
    assert "open" in states(browser)
    assert harness_log(browser)["errors"] == []
    # unsubscribing closes that topic's stream; the pattern's still delivers
    browser.execute_script("window.harness.unsubscribe('job:1')")
    wait_js(browser, "window.harness.relay.topics.length === 1", 5)
    time.sleep(0.3)
    relay.emit_lines([progress("job:1", n + 1, n + 1)])
    wait_js(browser, f"window.harness.log.events.length >= {2 * n + 2}", 10, "the pattern's event")
    time.sleep(0.3)
    assert len(events_of(browser, "job:1")) == n
    assert relay.stats().get("sse_connections") == 1


def test_auto_sse_resumes_across_a_relay_restart(browser, page_server, relay_factory, no_upgrade_proxy):
    relay = relay_factory(start=False)
    relay.extra_args += ["--state-file", str(relay.dir / "state"), "--sse-retry", "200"]
    relay.start()
    ngx = no_upgrade_proxy(relay)
    open_harness(browser, page_server)
    browser.execute_script(
        "return window.harness.start(arguments[0], {token: arguments[1], topics: ['job:r'],"
        " options: {minDelay: 200}})", f"ws://127.0.0.1:{ngx.port}/ws", relay.token(topics=["job:*"]))
    wait_js(browser, "window.harness.log.statuses.length === 1", 15, "the subscription over SSE")
    assert browser.execute_script("return window.harness.relay.transport") == "sse"
    n = 60
    emitter = Emitter(relay.socket_path, [progress("job:r", i, n) for i in range(1, n + 1)], interval=0.04)
    emitter.start()
    wait_js(browser, "window.harness.log.events.length >= 20", 15, "the first events")
    assert relay.stop() == 0
    time.sleep(0.3)
    relay.start()
    emitter.finish()
    wait_js(browser, f"window.harness.log.events.length >= {n}", 25, "every event after the restart")
    time.sleep(0.5)
    events = events_of(browser, "job:r")
    assert_exactly_once(events, n, "job:r")
    assert not any(e["info"]["gap"] for e in events)
    log = harness_log(browser)
    assert states(browser).count("open") >= 2, log["states"]
    resumed = [s for s in log["statuses"] if s["status"] == "subscribed"][1:]
    assert resumed and all(s["resumed"] and s["recovered"] for s in resumed), resumed
    assert all(s["epoch"] == log["statuses"][0]["epoch"] for s in resumed)
    # the reconnect carried the client's own resume point
    later = [urllib.parse.parse_qs(urllib.parse.urlsplit(u).query) for u in streams(browser)[1:]]
    assert later and all(q.get("epoch") and q.get("since") for q in later), later
    assert [t["transport"] for t in log["transports"]] == ["sse"]


@pytest.mark.parametrize("refresh_before", [30000, 0], ids=["refresh", "expiry"])
def test_auto_sse_token_expiry_continues_with_a_fresh_token(browser, page_server, relay_factory,
                                                            no_upgrade_proxy, refresh_before):
    """A 4-second token and getToken: on SSE a refresh reopens the stream with the new token
    (`refresh`), or the relay's `event: error` at expiry makes the client reconnect with a fresh
    one (`expiry`, refreshBefore 0); either way every event arrives once, in order."""
    relay = relay_factory()
    page_server.relay = relay
    ngx = no_upgrade_proxy(relay)
    open_harness(browser, page_server)
    browser.execute_script(
        "return window.harness.start(arguments[0], {tokenQuery: 'ttl=4&topics=job:*', topics: ['job:t'],"
        " options: {minDelay: 100, refreshBefore: arguments[1]}})", f"ws://127.0.0.1:{ngx.port}/ws", refresh_before)
    wait_js(browser, "window.harness.log.statuses.length >= 1", 15, "the subscription over SSE")
    n = 70
    emitter = Emitter(relay.socket_path, [progress("job:t", i, n) for i in range(1, n + 1)], interval=0.15)
    emitter.start()
    emitter.finish()
    wait_js(browser, f"window.harness.log.events.length >= {n}", 15, "every event")
    time.sleep(0.5)
    events = events_of(browser, "job:t")
    assert_exactly_once(events, n, "job:t")
    assert not any(e["info"]["gap"] for e in events)
    log = harness_log(browser)
    assert log["getTokenCalls"] >= 3, log["getTokenCalls"]     # > 10 s of 4-second tokens
    assert len(streams(browser)) >= 3
    assert browser.execute_script("return window.harness.relay.transport") == "sse"
    if refresh_before:
        assert [t for t in log["tokens"] if t["refreshed"]], log["tokens"]
        assert not [e for e in log["errors"] if e["code"] == "unauthorized"], log["errors"]
    else:
        assert [e for e in log["errors"] if e["code"] == "unauthorized" and not e["fatal"]], log["errors"]
    assert not [e for e in log["errors"] if e["fatal"]], log["errors"]


@pytest.mark.parametrize("token_transport", ["protocol", "query"])
def test_forced_sse_without_a_proxy(browser, page_server, relay_factory, token_transport):
    relay = relay_factory()
    token = relay.token(topics=["job:*"])
    relay.emit_lines([progress("job:f", 1, 3)])
    open_harness(browser, page_server)
    browser.execute_script(
        "return window.harness.start(arguments[0], {token: arguments[1], topics: ['job:f'],"
        " options: {transport: 'sse', tokenTransport: arguments[2]}})", relay.url, token, token_transport)
    wait_js(browser, "window.harness.log.events.length === 1", 10, "the newest event")
    relay.emit_lines([progress("job:f", i, 3) for i in (2, 3)])
    wait_js(browser, "window.harness.log.events.length === 3", 10, "the live events")
    time.sleep(0.3)
    assert [e["event"]["i"] for e in events_of(browser, "job:f")] == [1, 2, 3]
    log = harness_log(browser)
    assert opened_websockets(browser) == [], "no WebSocket with transport 'sse'"
    assert [t["transport"] for t in log["transports"]] == ["sse"]
    assert [s["state"] for s in log["states"]][:2] == ["connecting", "open"]
    [url] = streams(browser)
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    assert url.startswith(relay.http_base + "/sse?")
    if token_transport == "query":
        assert query["token"] == [token] and "ticket" not in query
    else:
        assert query["ticket"] and "token" not in query
    assert relay.stats().get("sse_connections") == 1
    assert log["errors"] == []
    # an unknown transport is refused by the constructor
    error = browser.execute_script(
        "try { new window.harness.relay.constructor(arguments[0], {token: 'x', transport: 'carrier-pigeon'}); return null }"
        " catch (e) { return e.name + ': ' + e.message }", relay.url)
    assert error and error.startswith("TypeError") and "transport" in error, error
    browser.execute_script("window.harness.close()")


def test_websocket_transport_does_not_fall_back(browser, page_server, relay_factory, no_upgrade_proxy):
    relay = relay_factory()
    ngx = no_upgrade_proxy(relay)
    open_harness(browser, page_server)
    browser.execute_script(
        "return window.harness.start(arguments[0], {token: arguments[1], topics: ['job:w'],"
        " options: {transport: 'websocket', minDelay: 50, maxDelay: 200}})",
        f"ws://127.0.0.1:{ngx.port}/ws", relay.token(topics=["job:*"]))
    wait_js(browser, "window.harness.log.opened.length >= 4", 10, "several handshakes")
    assert streams(browser) == [] and harness_log(browser)["transports"] == []
    assert browser.execute_script("return window.harness.relay.transport") == "websocket"
    browser.execute_script("window.harness.close()")


def test_auto_stays_on_websocket_while_the_relay_is_down(browser, page_server, relay_factory):
    """Handshakes failing because nothing answers at all (the relay not started yet) are no
    reason for SSE: the client keeps trying the WebSocket and uses it once the relay is up."""
    relay = relay_factory(start=False)
    open_harness(browser, page_server)
    browser.execute_script(
        "return window.harness.start(arguments[0], {token: arguments[1], topics: ['job:d'],"
        " options: {minDelay: 100, maxDelay: 300}})", relay.url, relay.token(topics=["job:*"]))
    wait_js(browser, "window.harness.log.opened.length >= 3", 10, "several failed handshakes")
    relay.start()
    wait_js(browser, "window.harness.log.statuses.length === 1", 15, "the subscription")
    assert browser.execute_script("return window.harness.relay.transport") == "websocket"
    assert streams(browser) == []
    assert [t["transport"] for t in harness_log(browser)["transports"]] == ["websocket"]


def test_live_page_behind_a_proxy_that_refuses_upgrades(browser, page_server, relay_factory, no_upgrade_proxy,
                                                          output_dir):
    """The live page (clients/js/live.html, which the relay serves at `/`) through the proxy: the
    same client falls back. nginx serves the page and the module from clients/js, so that the test
    runs them as they are in the tree, not as the relay binary embedded them when it was built."""
    relay = relay_factory()
    ngx = no_upgrade_proxy(relay, static=True)
    relay.emit_lines([{"topic": "task:7", "type": "progress", "progress": 42, "message": "resizing"}])
    browser.get("about:blank")
    token = relay.token(topics=["task:*"])
    browser.get(f"http://127.0.0.1:{ngx.port}/#token={token}")
    wait_js(browser, "document.getElementById('connection').dataset.state === 'open'", 15, "the page to connect")
    assert connection_text(browser) == "Live"
    assert browser.execute_script("return document.getElementById('connection').dataset.transport") == "sse"
    wait_row(browser, "task:7", lambda r: r["valuenow"] == "42", what="the bar at 42 %")
    relay.emit_lines([{"topic": "task:7", "type": "complete", "success": True, "message": "done"}])
    wait_row(browser, "task:7", lambda r: r["state"] == "complete", what="the task complete")
    browser.save_screenshot(str(output_dir / "live-sse.png"))
    browser.get("about:blank")
