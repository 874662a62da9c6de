"""progress-relay.js in headless Chromium against real relays.

The page is tests/pages/module.html, served from a loopback HTTP server next to the module; it
connects across origins to the relay (no --allow-origin: any origin may)."""

from __future__ import annotations

import signal
import time

from jshelpers import (Emitter, assert_exactly_once, emit_one, events_of, harness_log, open_harness, progress,
                       states, wait_js)


# ---------------------------------------------------------------------------------------------

def test_events_arrive_in_order_once_per_subscription(browser, page_server, relay_factory):
    relay = relay_factory()
    open_harness(browser, page_server)
    browser.execute_script(
        "return window.harness.start(arguments[0], {token: arguments[1], topics: ['job:1', 'job:*']})",
        relay.url, relay.token(topics=["job:*"]))
    wait_js(browser, "window.harness.log.statuses.filter(s => s.status === 'subscribed').length === 2", 10,
            "both subscriptions to be answered")
    n = 200
    relay.emit_lines([progress("job:1", i, n) for i in range(1, n + 1)]
                     + [{"topic": "job:2", "type": "complete", "success": True, "message": "done"}])
    wait_js(browser, f"window.harness.log.events.length >= {2 * n + 1}", 15, "every event")
    time.sleep(0.3)
    exact = events_of(browser, "job:1")
    pattern = [e for e in events_of(browser, "job:*") if e["event"]["topic"] == "job:1"]
    assert_exactly_once(exact, n, "job:1")
    assert_exactly_once(pattern, n, "job:*")
    assert all(e["info"]["gap"] is False for e in exact + pattern)
    other = [e["event"] for e in events_of(browser, "job:*") if e["event"]["topic"] == "job:2"]
    assert other == [{"seq": 1, "topic": "job:2", "type": "complete", "success": True, "message": "done"}]
    assert exact[-1]["event"] == {"seq": n, **progress("job:1", n, n)}
    log = harness_log(browser)
    first = [s for s in log["statuses"] if s["sub"] == "job:1"][0]
    assert first["status"] == "subscribed" and first["resumed"] is False and first["epoch"], first
    assert [s["state"] for s in log["states"]][:2] == ["connecting", "open"]
    assert log["errors"] == []


def test_new_listener_starts_with_the_current_state(browser, page_server, relay_factory):
    """A second listener on a topic the connection already holds gets the newest event from the
    client (the relay does not send it again); the first listener gets nothing twice."""
    relay = relay_factory()
    relay.emit_lines([progress("job:c", i, 3) for i in (1, 2, 3)])
    open_harness(browser, page_server)
    browser.execute_script("return window.harness.start(arguments[0], {token: arguments[1], topics: ['job:c']})",
                           relay.url, relay.token(topics=["*"]))
    wait_js(browser, "window.harness.log.events.length === 1", 10, "the newest event")
    first = events_of(browser, "job:c")
    assert [e["event"]["seq"] for e in first] == [3] and first[0]["info"]["cached"] is False
    browser.execute_script("window.harness.subscribe('job:*')")
    wait_js(browser, "window.harness.log.events.length === 2", 5)
    relay.emit_lines([progress("job:c", 4, 4)])
    wait_js(browser, "window.harness.log.events.length === 4", 5)
    time.sleep(0.3)
    assert [e["event"]["seq"] for e in events_of(browser, "job:c")] == [3, 4]
    pattern = events_of(browser, "job:*")
    assert [(e["event"]["seq"], e["info"]["cached"]) for e in pattern] == [(3, True), (4, False)]
    # unsubscribing the last listener of a topic ends its subscription at the relay
    browser.execute_script("window.harness.unsubscribe('job:c')")
    relay.emit_lines([progress("job:c", 5, 5)])
    wait_js(browser, "window.harness.log.events.length === 5", 5)
    time.sleep(0.3)
    assert [e["event"]["seq"] for e in events_of(browser, "job:c")] == [3, 4]
    assert harness_log(browser)["events"][-1]["sub"] == "job:*"


def test_relay_restart_with_state_file_mid_stream_every_event_once(browser, page_server, relay_factory):
    relay = relay_factory(start=False)
    relay.extra_args += ["--state-file", str(relay.dir / "state")]
    relay.start()
    open_harness(browser, page_server)
    browser.execute_script(
        "return window.harness.start(arguments[0], {token: arguments[1], topics: ['job:r'],"
        " options: {minDelay: 200}})", relay.url, relay.token(topics=["job:*"]))
    wait_js(browser, "window.harness.log.statuses.length === 1", 10, "the subscription")
    n = 60
    emitter = Emitter(relay.socket_path, [progress("job:r", i, n) for i in range(1, n + 1)], interval=0.04)
    emitter.start()
    wait_js(browser, "window.harness.log.events.length >= 20", 15, "the first events")
    assert relay.stop() == 0          # SIGTERM: subscribers get 1001, the state file is written
    time.sleep(0.3)                   # the emitter retries meanwhile, as emitters do
    relay.start()
    emitter.finish()
    wait_js(browser, f"window.harness.log.events.length >= {n}", 20, "every event after the restart")
    time.sleep(0.5)
    events = events_of(browser, "job:r")
    assert_exactly_once(events, n, "job:r")
    assert not any(e["info"]["gap"] for e in events)
    log = harness_log(browser)
    closes = [s for s in log["states"] if s["state"] == "connecting" and s.get("code") is not None]
    assert closes and closes[0]["code"] == 1001, log["states"]
    assert states(browser).count("open") >= 2
    resumed = [s for s in log["statuses"] if s["status"] == "subscribed"][1:]
    assert resumed and all(s["resumed"] and s["recovered"] for s in resumed), resumed
    first_epoch = log["statuses"][0]["epoch"]
    assert all(s["epoch"] == first_epoch for s in resumed)


def test_relay_restart_without_state_reports_recovered_false(browser, page_server, relay_factory):
    """Killed relay (no state): new epoch; the client says the gap could not be filled and the
    topic's numbering starts again, and the next event is delivered, not mistaken for a repeat."""
    relay = relay_factory()
    open_harness(browser, page_server)
    browser.execute_script(
        "return window.harness.start(arguments[0], {token: arguments[1], topics: ['job:k', 'job:*'],"
        " options: {minDelay: 200}})", relay.url, relay.token(topics=["job:*"]))
    wait_js(browser, "window.harness.log.statuses.length === 2", 10)
    relay.emit_lines([progress("job:k", i, 5) for i in (1, 2, 3)])
    wait_js(browser, "window.harness.log.events.length === 6", 10)
    relay.kill()
    relay.start()
    wait_js(browser, "window.harness.log.statuses.length === 4", 20, "the subscriptions to be made again")
    relay.emit_lines([progress("job:k", 4, 5)])
    wait_js(browser, "window.harness.log.events.length === 8", 10, "the event after the restart")
    log = harness_log(browser)
    again = [s for s in log["statuses"] if s["sub"] == "job:k"][1]
    assert again["resumed"] is True and again["recovered"] is False and again["seq"] == 0, again
    for sub in ("job:k", "job:*"):
        last = events_of(browser, sub)[-1]
        assert last["event"]["seq"] == 1 and last["event"]["i"] == 4 and last["info"]["gap"] is True, last


def test_expired_token_is_replaced_through_getToken(browser, page_server, relay_factory):
    """A token that has already expired is not even tried: getToken gives the one to connect with."""
    relay = relay_factory()
    page_server.relay = relay
    open_harness(browser, page_server)
    browser.execute_script(
        "return window.harness.start(arguments[0], {token: arguments[1], tokenQuery: 'ttl=600&topics=job:*',"
        " topics: ['job:t']})", relay.url, relay.token(topics=["job:*"], exp_in=-5))
    relay.emit_lines([progress("job:t", 1, 1)])
    wait_js(browser, "window.harness.log.events.length === 1", 15, "the event with the fresh token")
    log = harness_log(browser)
    assert log["getTokenCalls"] == 1 and page_server.tokens_minted == 1
    assert states(browser) == ["connecting", "open"], log["states"]
    assert log["errors"] == []


def test_refused_token_closes_4401_and_getToken_gives_a_fresh_one(browser, page_server, relay_factory):
    """A token the relay refuses (here: signed with another secret): error frame, close 4401;
    the client asks getToken for a fresh token and connects with it."""
    relay = relay_factory()
    page_server.relay = relay
    open_harness(browser, page_server)
    browser.execute_script(
        "return window.harness.start(arguments[0], {token: arguments[1], tokenQuery: 'ttl=600&topics=job:*',"
        " topics: ['job:t'], options: {minDelay: 100}})",
        relay.url, relay.token(topics=["job:*"], secret="not the relay's secret"))
    relay.emit_lines([progress("job:t", 1, 1)])
    wait_js(browser, "window.harness.log.events.length === 1", 15, "the event with the fresh token")
    log = harness_log(browser)
    assert log["getTokenCalls"] == 1 and page_server.tokens_minted == 1
    assert any(s["state"] == "connecting" and s.get("code") == 4401 for s in log["states"]), log["states"]
    assert [e["code"] for e in log["errors"]] == ["unauthorized"], log["errors"]
    assert browser.execute_script("return window.harness.state") == "open"


def test_refused_token_without_getToken_stops(browser, page_server, relay_factory):
    relay = relay_factory()
    open_harness(browser, page_server)
    browser.execute_script(
        "return window.harness.start(arguments[0], {token: arguments[1], topics: ['job:t']})",
        relay.url, relay.token(topics=["job:*"], secret="not the relay's secret"))
    wait_js(browser, "window.harness.state === 'closed'", 10)
    time.sleep(1)
    log = harness_log(browser)
    assert [s["state"] for s in log["states"]] == ["connecting", "open", "closed"], log["states"]
    assert log["states"][-1]["fatal"] is True and log["states"][-1]["code"] == 4401


def test_token_refreshed_before_exp_keeps_the_connection(browser, page_server, relay_factory):
    """Tokens of 16 s: the client refreshes each at 3/4 of its life over the open connection.
    (The relay takes at most one refresh per 10 s per connection: shorter tokens would be
    refreshed more often than that; whole-second exp and iat need a second of margin.)"""
    relay = relay_factory()
    page_server.relay = relay
    open_harness(browser, page_server)
    browser.execute_script(
        "return window.harness.start(arguments[0], {tokenQuery: 'ttl=16&topics=job:*', topics: ['job:f']})",
        relay.url)
    wait_js(browser, "window.harness.log.statuses.length === 1", 10)
    n = 70
    emitter = Emitter(relay.socket_path, [progress("job:f", i, n) for i in range(1, n + 1)], interval=0.4)
    emitter.start()
    emitter.finish()
    wait_js(browser, f"window.harness.log.events.length === {n}", 40)
    log = harness_log(browser)
    assert_exactly_once(events_of(browser, "job:f"), n, "job:f")
    refreshed = [t for t in log["tokens"] if t["refreshed"]]
    assert len(refreshed) >= 2, log["tokens"]
    assert states(browser) == ["connecting", "open"], log["states"]   # never dropped
    assert log["errors"] == []


def test_token_expiry_without_refresh_reconnects_and_resumes(browser, page_server, relay_factory):
    """refreshBefore: 0: the relay closes with 4401 when the token expires; the client takes a
    fresh token from getToken, reconnects and resumes: nothing lost, nothing twice."""
    relay = relay_factory()
    page_server.relay = relay
    open_harness(browser, page_server)
    browser.execute_script(
        "return window.harness.start(arguments[0], {tokenQuery: 'ttl=3&topics=job:*', topics: ['job:x'],"
        " options: {refreshBefore: 0, minDelay: 100}})", relay.url)
    wait_js(browser, "window.harness.log.statuses.length === 1", 10)
    n = 30
    emitter = Emitter(relay.socket_path, [progress("job:x", i, n) for i in range(1, n + 1)], interval=0.15)
    emitter.start()
    emitter.finish()
    wait_js(browser, f"window.harness.log.events.length === {n}", 15)
    time.sleep(0.3)
    log = harness_log(browser)
    assert_exactly_once(events_of(browser, "job:x"), n, "job:x")
    assert any(s.get("code") == 4401 for s in log["states"]), log["states"]
    assert log["getTokenCalls"] >= 2
    resumed = [s for s in log["statuses"] if s["status"] == "subscribed"][1:]
    assert resumed and all(s["resumed"] and s["recovered"] for s in resumed), resumed


def test_forbidden_topics_are_reported_to_their_listener(browser, page_server, relay_factory):
    relay = relay_factory()
    page_server.relay = relay
    open_harness(browser, page_server)
    browser.execute_script(
        "return window.harness.start(arguments[0], {token: arguments[1], tokenQuery: 'ttl=600&topics=job:a',"
        " topics: ['job:a', 'job:b', 'secret:1']})",
        relay.url, relay.token(topics=["job:*"], exp_in=3))
    wait_js(browser, "window.harness.log.statuses.length === 3", 10)
    log = harness_log(browser)
    denied = [s for s in log["statuses"] if s["sub"] == "secret:1"]
    assert denied == [{"sub": "secret:1", "status": "error", "topic": "secret:1", "code": "forbidden",
                       "message": denied[0]["message"]}], denied
    assert browser.execute_script("return window.harness.relay.topics") == ["job:a", "job:b"]
    # The refresh (at 3/4 of the first token's 3 s) brings a token that no longer covers job:b:
    # the relay ends that subscription.
    wait_js(browser, "window.harness.log.statuses.some(s => s.status === 'ended')", 10)
    ended = [s for s in harness_log(browser)["statuses"] if s["status"] == "ended"]
    assert ended == [{"sub": "job:b", "status": "ended", "topic": "job:b", "reason": "forbidden"}]
    assert browser.execute_script("return window.harness.relay.topics") == ["job:a"]
    relay.emit_lines([progress("job:a", 1, 1), progress("job:b", 1, 1)])
    wait_js(browser, "window.harness.log.events.length === 1", 5)
    time.sleep(0.3)
    assert [e["event"]["topic"] for e in harness_log(browser)["events"]] == ["job:a"]
    assert browser.execute_script("return window.harness.state") == "open"


def test_close_4403_stops_without_reconnecting(browser, page_server, relay_factory):
    relay = relay_factory()
    open_harness(browser, page_server)
    browser.execute_script(
        "return window.harness.start(arguments[0] + '?topic=secret:1', {token: arguments[1], topics: ['job:1']})",
        relay.url, relay.token(topics=["job:*"]))
    wait_js(browser, "window.harness.state === 'closed'", 10)
    time.sleep(1.5)
    log = harness_log(browser)
    assert [s["state"] for s in log["states"]] == ["connecting", "open", "closed"], log["states"]
    assert log["states"][-1].get("fatal") is True and log["states"][-1].get("code") == 4403
    assert any(e["code"] == "forbidden" and e.get("fatal") for e in log["errors"]), log["errors"]


def test_dead_connection_is_detected_and_replaced(browser, page_server, relay_factory):
    """The relay is frozen (SIGSTOP): no frame comes back. With pingInterval 1 s the client
    declares the connection dead after two intervals and reconnects once the relay answers."""
    relay = relay_factory()
    open_harness(browser, page_server)
    browser.execute_script(
        "return window.harness.start(arguments[0], {token: arguments[1], topics: ['job:d'],"
        " options: {pingInterval: 1000, connectTimeout: 1500, minDelay: 100, maxDelay: 1000}})",
        relay.url, relay.token(topics=["job:*"]))
    wait_js(browser, "window.harness.log.statuses.length === 1", 10)
    relay.emit_lines([progress("job:d", 1, 3)])
    wait_js(browser, "window.harness.log.events.length === 1", 5)
    time.sleep(2.5)   # idle but alive: pings answered, no reconnect
    assert states(browser) == ["connecting", "open"]
    relay.send_signal(signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        wait_js(browser, "window.harness.state === 'connecting'", 6, "the dead connection to be noticed")
        noticed = time.monotonic() - t0
    finally:
        relay.send_signal(signal.SIGCONT)
    assert noticed <= 4.5, noticed   # two intervals after the last frame (a pong), plus a tick
    dead = [s for s in harness_log(browser)["states"] if "dead" in (s.get("reason") or "")]
    assert dead, harness_log(browser)["states"]
    wait_js(browser, "window.harness.state === 'open'", 10, "a new connection")
    relay.emit_lines([progress("job:d", 2, 3), progress("job:d", 3, 3)])
    wait_js(browser, "window.harness.log.events.length === 3", 10)
    time.sleep(0.3)
    assert [e["event"]["seq"] for e in events_of(browser, "job:d")] == [1, 2, 3]


def test_getToken_may_answer_the_token_endpoint_json(browser, page_server, relay_factory):
    """getToken may give the token endpoint's JSON answer, `{"topic", "url", "token"}`, as
    `response.json()` gives it: the client takes `token` (at connect and at refresh)."""
    relay = relay_factory()
    page_server.relay = relay
    open_harness(browser, page_server)
    browser.execute_script(
        "return window.harness.start(arguments[0], {tokenQuery: 'shape=json&ttl=14&topics=job:j',"
        " topics: ['job:j'], options: {refreshBefore: 10000}})", relay.url)
    wait_js(browser, "window.harness.log.statuses.length === 1", 15, "the subscription")
    relay.emit_lines([progress("job:j", 1, 2)])
    wait_js(browser, "window.harness.log.events.length === 1", 10, "the first event")
    log = harness_log(browser)
    assert log["getTokenCalls"] == 1 and page_server.tokens_minted == 1
    token = browser.execute_script("return window.harness.relay.token")
    assert isinstance(token, str) and token.count(".") == 2, token
    assert log["opened"][0]["protocols"] == ["progress-relay.v1", "bearer." + token], log["opened"]
    # A 14 s token is refreshed 3.5 s before exp: again from the JSON answer, on the same connection.
    wait_js(browser, "window.harness.log.tokens.some((t) => t.refreshed)", 20, "the refresh")
    relay.emit_lines([progress("job:j", 2, 2)])
    wait_js(browser, "window.harness.log.events.length === 2", 10, "the second event")
    log = harness_log(browser)
    assert log["getTokenCalls"] == 2, log["getTokenCalls"]
    assert states(browser) == ["connecting", "open"], log["states"]
    assert [e for e in log["errors"] if e["code"] == "token"] == [], log["errors"]


def test_ping_interval_comes_from_the_relay(browser, page_server, relay_factory):
    """Without pingInterval the client takes the relay's --ping-interval from the first
    `subscribed` frame (`ping_interval`, seconds): with --ping-interval 1 a frozen relay is
    noticed within seconds, not after the default's 50. A pingInterval the page sets is kept."""
    relay = relay_factory("--ping-interval", "1")
    open_harness(browser, page_server)
    browser.execute_script(
        "return window.harness.start(arguments[0], {token: arguments[1], topics: ['job:p'],"
        " options: {connectTimeout: 1500, minDelay: 100, maxDelay: 1000}})",
        relay.url, relay.token(topics=["job:*"]))
    wait_js(browser, "window.harness.log.statuses.length === 1", 10)
    assert browser.execute_script("return window.harness.relay.options.pingInterval") == 1000
    time.sleep(2.5)   # idle but alive: no reconnect
    assert states(browser) == ["connecting", "open"]
    relay.send_signal(signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        wait_js(browser, "window.harness.state === 'connecting'", 8, "the dead connection to be noticed")
        noticed = time.monotonic() - t0
    finally:
        relay.send_signal(signal.SIGCONT)
    assert noticed <= 4.5, noticed
    wait_js(browser, "window.harness.state === 'open'", 10, "a new connection")
    browser.execute_script("window.harness.close(); return true")

    # An explicit pingInterval wins over the relay's.
    open_harness(browser, page_server)
    browser.execute_script(
        "return window.harness.start(arguments[0], {token: arguments[1], topics: ['job:q'],"
        " options: {pingInterval: 7000}})", relay.url, relay.token(topics=["job:*"]))
    wait_js(browser, "window.harness.log.statuses.length === 1", 10)
    assert browser.execute_script("return window.harness.relay.options.pingInterval") == 7000
