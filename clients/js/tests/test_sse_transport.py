"""Issue 16 section 3: the client's `transport` option and its server-sent events fallback.

With `transport: 'auto'` (the default) the client tries the WebSocket and, after two handshakes
failing without ever opening while the host still answers HTTP, switches to SSE (`GET /sse`, one
EventSource per subscription, each with a one-time ticket and the client's own resume point).
The proxy here is Debian's nginx refusing upgrades on /ws (`return 403`) and proxying /sse
unbuffered, as examples/nginx/progress-relay.conf does. `transport: 'sse'` needs no proxy.

Refusals: the relay answers a stream it refuses with 401 or 403 and a JSON body, which an
EventSource cannot read; the client asks the same question again with fetch and then does what
it does on a WebSocket (4401: getToken and reconnect, or stop; `forbidden`: the subscription's
error, not retried). The tests count the requests in nginx's access log."""

from __future__ import annotations

import time
import urllib.parse

import pytest
from selenium.webdriver.common.by import By

import nginxlib
from jshelpers import (Emitter, assert_exactly_once, connection_text, events_of, harness_log, no_upgrade_nginx,
                       open_harness, progress, states, wait_js, wait_row)


@pytest.fixture
def no_upgrade_proxy():
    """make(relay, static=False) -> a started nginx in front of `relay` that refuses upgrades on
    /ws (jshelpers.no_upgrade_nginx), cleaned up at teardown."""
    if not nginxlib.have_nginx():
        pytest.fail(nginxlib.SKIP_REASON)
    made: list[nginxlib.Nginx] = []

    def make(relay, static: bool = False) -> nginxlib.Nginx:
        ngx = no_upgrade_nginx(relay.port, static=static)
        made.append(ngx)
        return ngx

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
    badge = browser.find_element(By.ID, "transport")
    assert badge.is_displayed() and badge.text == "over SSE", badge.text
    wait_row(browser, "task:7", lambda r: r["valuenow"] == "42", what="the bar at 42 %")
    relay.emit_lines([{"topic": "task:7", "type": "complete", "success": True, "message": "done"}])
    wait_row(browser, "task:7", lambda r: r["state"] == "complete", what="the task complete")
    browser.save_screenshot(str(output_dir / "live-sse.png"))
    browser.get("about:blank")


# ---------------------------------------------------------------------------------------------
# refusals: the relay answers 401 or 403 (with a JSON body) before a stream starts, which an
# EventSource cannot read; the client asks again with fetch and does what it does on a WebSocket

def sse_requests(ngx, topic: str | None = None) -> list[str]:
    """The lines of nginx's access log for GET /sse (of `topic` when given). nginx logs a request
    when it ends: a stream still open is not there yet."""
    log = (ngx.dir / "access.log").read_text(errors="replace") if (ngx.dir / "access.log").exists() else ""
    lines = [line for line in log.splitlines() if '"GET /sse?' in line]
    if topic is not None:
        wanted = urllib.parse.quote(topic, safe="")
        lines = [line for line in lines if f"topic={wanted}&" in line or f"topic={wanted} " in line]
    return lines


def proxy_requests(ngx) -> list[str]:
    path = ngx.dir / "access.log"
    return path.read_text(errors="replace").splitlines() if path.exists() else []


@pytest.mark.parametrize("token_transport", ["protocol", "query"], ids=["ticket", "query"])
def test_sse_forbidden_topic_is_reported_once_as_on_websocket(browser, page_server, relay_factory, no_upgrade_proxy,
                                                              token_transport):
    """A topic the token does not grant: the relay answers its stream 403. Its listener gets the
    status a WebSocket subscription gets from the relay's `forbidden` error frame, an `error`
    event follows, the subscription ends and is not asked for again, and the other one goes on.
    ticket: the question goes with a fresh ticket (the stream used the first); query: the same
    URL, ?token= and all."""
    relay = relay_factory()
    ngx = no_upgrade_proxy(relay)
    open_harness(browser, page_server)
    browser.execute_script(
        "return window.harness.start(arguments[0], {token: arguments[1], topics: ['job:1', 'secret:1'],"
        " options: {minDelay: 100, maxDelay: 300, tokenTransport: arguments[2]}})",
        f"ws://127.0.0.1:{ngx.port}/ws", relay.token(topics=["job:*"]), token_transport)
    wait_js(browser, "window.harness.log.statuses.length >= 2", 15, "both subscriptions answered over SSE")
    assert browser.execute_script("return window.harness.relay.transport") == "sse"
    log = harness_log(browser)
    denied = [s for s in log["statuses"] if s["sub"] == "secret:1"]
    assert denied == [{"sub": "secret:1", "status": "error", "topic": "secret:1", "code": "forbidden",
                       "message": "topic not granted"}], denied
    assert [(e["code"], e["message"], e["topic"], e["fatal"]) for e in log["errors"]] == [
        ("forbidden", "topic not granted", "secret:1", False)], log["errors"]
    assert browser.execute_script("return window.harness.relay.topics") == ["job:1"]
    # not retried: one EventSource and one question, however long the client runs
    time.sleep(2.0)   # minDelay 100 ms: a retry loop would have asked many times by now
    assert len(sse_requests(ngx, "secret:1")) == 2, sse_requests(ngx, "secret:1")
    assert len([s for s in streams(browser) if "secret%3A1" in s]) == 1, streams(browser)
    # the granted subscription goes on, on its one stream
    relay.emit_lines([progress("job:1", 1, 1), progress("secret:1", 1, 1)])
    wait_js(browser, "window.harness.log.events.length === 1", 10, "job:1's event")
    time.sleep(0.3)
    assert [e["event"]["topic"] for e in harness_log(browser)["events"]] == ["job:1"]
    assert states(browser)[-1] == "open" and not any(s.get("fatal") for s in harness_log(browser)["states"])
    assert sse_requests(ngx, "job:1") == [], "job:1's one stream is still open"
    assert relay.stats().get("sse_connections") == 1


def test_sse_only_forbidden_topic_leaves_the_client_open(browser, page_server, relay_factory, no_upgrade_proxy):
    """Its one subscription refused, the client is open with none, as on a WebSocket."""
    relay = relay_factory()
    ngx = no_upgrade_proxy(relay)
    open_harness(browser, page_server)
    browser.execute_script(
        "return window.harness.start(arguments[0], {token: arguments[1], topics: ['secret:1'],"
        " options: {minDelay: 100, maxDelay: 300}})", f"ws://127.0.0.1:{ngx.port}/ws", relay.token(topics=["job:*"]))
    wait_js(browser, "window.harness.log.statuses.length === 1", 15, "the refusal")
    time.sleep(1.5)
    log = harness_log(browser)
    assert [(s["status"], s["code"]) for s in log["statuses"]] == [("error", "forbidden")]
    assert browser.execute_script("return window.harness.state") == "open"
    assert not any(s.get("fatal") for s in log["states"]), log["states"]
    assert len(sse_requests(ngx, "secret:1")) == 2 and browser.execute_script("return window.harness.relay.topics") == []


@pytest.mark.parametrize("token_transport", ["protocol", "query"], ids=["ticket", "query"])
def test_sse_refused_token_gets_a_fresh_one_from_getToken(browser, page_server, relay_factory, no_upgrade_proxy,
                                                          token_transport):
    """A token the relay refuses (signed with another secret), as in test_module's 4401 test:
    the `unauthorized` error, a state `connecting` with code 4401, one call of getToken, and the
    fresh token's stream delivers. ticket: POST /ticket answers 401; query: the stream is refused
    with 401, which the client learns by asking again with fetch."""
    relay = relay_factory()
    page_server.relay = relay
    ngx = no_upgrade_proxy(relay)
    bad = relay.token(topics=["job:*"], secret="not the relay's secret")
    open_harness(browser, page_server)
    browser.execute_script(
        "return window.harness.start(arguments[0], {token: arguments[1], tokenQuery: 'ttl=600&topics=job:*',"
        " topics: ['job:t'], options: {minDelay: 100, tokenTransport: arguments[2]}})",
        f"ws://127.0.0.1:{ngx.port}/ws", bad, token_transport)
    wait_js(browser, "window.harness.log.statuses.length === 1", 15, "the subscription with the fresh token")
    relay.emit_lines([progress("job:t", 1, 1)])
    wait_js(browser, "window.harness.log.events.length === 1", 10, "the event")
    log = harness_log(browser)
    assert log["getTokenCalls"] == 1 and page_server.tokens_minted == 1
    assert [s["status"] for s in log["statuses"]] == ["subscribed"]
    assert [(e["code"], e["fatal"]) for e in log["errors"]] == [("unauthorized", False)], log["errors"]
    assert any(s["state"] == "connecting" and s.get("code") == 4401 for s in log["states"]), log["states"]
    assert browser.execute_script("return window.harness.state") == "open"
    assert browser.execute_script("return window.harness.relay.transport") == "sse"
    refused = [line.split('"')[1].split()[1] for line in proxy_requests(ngx) if '" 401 ' in line]
    if token_transport == "query":
        # the refused stream and the question, both with the refused token; the fresh token's
        # stream is still open (nginx logs a request when it ends)
        assert [r.split("?")[0] for r in refused] == ["/sse", "/sse"], refused
        assert all(urllib.parse.parse_qs(urllib.parse.urlsplit(r).query)["token"] == [bad] for r in refused)
        assert len(sse_requests(ngx, "job:t")) == 2
    else:
        # the ticket's POST answers the refusal before any stream
        assert refused == ["/ticket"], refused
        assert sse_requests(ngx, "job:t") == []


@pytest.mark.parametrize("token_transport", ["protocol", "query"], ids=["ticket", "query"])
def test_sse_refused_token_without_getToken_stops(browser, page_server, relay_factory, no_upgrade_proxy,
                                                   token_transport):
    """Without getToken the client stops, as test_module's test of a refused token does on a
    WebSocket (`closed`, fatal, code 4401), and asks the relay nothing more."""
    relay = relay_factory()
    ngx = no_upgrade_proxy(relay)
    open_harness(browser, page_server)
    browser.execute_script(
        "return window.harness.start(arguments[0], {token: arguments[1], topics: ['job:t'],"
        " options: {minDelay: 100, tokenTransport: arguments[2]}})",
        f"ws://127.0.0.1:{ngx.port}/ws", relay.token(topics=["job:*"], secret="not the relay's secret"),
        token_transport)
    wait_js(browser, "window.harness.state === 'closed'", 15)
    seen = len(proxy_requests(ngx))
    time.sleep(1.5)
    log = harness_log(browser)
    assert log["states"][-1]["state"] == "closed" and log["states"][-1]["fatal"] is True, log["states"]
    assert log["states"][-1]["code"] == 4401, log["states"]
    assert [(e["code"], e["fatal"]) for e in log["errors"]] == [("unauthorized", False), ("unauthorized", True)]
    assert "open" not in states(browser)
    assert len(proxy_requests(ngx)) == seen, proxy_requests(ngx)[seen:]


@pytest.mark.parametrize("transport", ["websocket", "sse"])
def test_refused_fresh_tokens_are_retried_with_backoff_on_both_transports(browser, page_server, relay_factory,
                                                                          no_upgrade_proxy, transport):
    """getToken keeps answering tokens the relay refuses (expired ones): on both transports the
    client asks again before each reconnect, with a growing backoff, and does not stop."""
    relay = relay_factory()
    page_server.relay = relay
    url = relay.url
    if transport == "sse":
        url = f"ws://127.0.0.1:{no_upgrade_proxy(relay).port}/ws"
    open_harness(browser, page_server)
    browser.execute_script(
        "return window.harness.start(arguments[0], {tokenQuery: 'ttl=-5&topics=job:*', topics: ['job:t'],"
        " options: {minDelay: 100, maxDelay: 800, transport: arguments[1] === 'sse' ? 'auto' : 'websocket'}})",
        url, transport)
    wait_js(browser, "window.harness.log.states.filter(s => s.code === 4401).length >= 3", 15,
            "several refusals of fresh tokens")
    log = harness_log(browser)
    assert browser.execute_script("return window.harness.relay.transport") == transport
    refused = [s for s in log["states"] if s["state"] == "connecting" and s.get("code") == 4401]
    attempts = [s["attempt"] for s in refused]
    assert attempts == sorted(attempts) and attempts[-1] > attempts[0], log["states"]
    assert log["getTokenCalls"] >= len(refused)
    assert not any(s.get("fatal") for s in log["states"]) and browser.execute_script("return window.harness.state") != "closed"
    assert {e["code"] for e in log["errors"]} == {"unauthorized"} and not any(e["fatal"] for e in log["errors"])
    browser.execute_script("window.harness.close()")
