"""Issue 14: the client keeps the token out of the URL.

By default the token goes in the WebSocket subprotocol (`progress-relay.v1`, `bearer.<JWT>`);
`tokenTransport: 'query'` puts it in `?token=`. The harness records every WebSocket the client
opens (URL, offered subprotocols, the one the relay selected)."""

from __future__ import annotations

import time

from jshelpers import events_of, harness_log, open_harness, wait_js


def opened(browser) -> list[dict]:
    return browser.execute_script("return window.harness.log.opened")


def test_default_offers_the_token_as_a_subprotocol_not_in_the_url(browser, page_server, relay_factory):
    relay = relay_factory()
    token = relay.token(topics=["job:*"])
    open_harness(browser, page_server)
    browser.execute_script(
        "return window.harness.start(arguments[0], {token: arguments[1], topics: ['job:1'],"
        " options: {minDelay: 200}})", relay.url, token)
    wait_js(browser, "window.harness.log.statuses.length === 1", 10, "the subscription")
    relay.emit_lines([{"topic": "job:1", "type": "progress", "progress": 10, "i": 1}])
    wait_js(browser, "window.harness.log.events.length === 1", 10, "the event")
    [first] = opened(browser)
    assert first["url"] == relay.url, first["url"]          # nothing in the query: no token
    assert "token" not in first["url"] and token.split(".")[1] not in first["url"]
    assert first["protocols"] == ["progress-relay.v1", "bearer." + token], first["protocols"]
    assert first["selected"] == "progress-relay.v1"
    # a reconnect (relay restart) offers it the same way
    relay.restart()
    wait_js(browser, "window.harness.log.opened.filter(o => o.selected).length >= 2", 20, "the reconnect")
    for entry in opened(browser):
        assert entry["url"] == relay.url and entry["protocols"][0] == "progress-relay.v1", entry
    assert harness_log(browser)["errors"] == []


def test_fresh_token_from_getToken_goes_in_the_subprotocol(browser, page_server, relay_factory):
    """A refused token (4401), then getToken's fresh one: both offered as subprotocols."""
    relay = relay_factory()
    page_server.relay = relay
    open_harness(browser, page_server)
    browser.execute_script(
        "return window.harness.start(arguments[0], {token: arguments[1], tokenQuery: 'ttl=600&topics=job:*',"
        " topics: ['job:g'], options: {minDelay: 100}})",
        relay.url, relay.token(topics=["job:*"], secret="not the relay's secret"))
    wait_js(browser, "window.harness.log.statuses.length === 1", 15, "the subscription with the fresh token")
    entries = opened(browser)
    assert len(entries) == 2, entries
    assert all(e["url"] == relay.url and e["protocols"][1].startswith("bearer.") for e in entries), entries
    assert entries[0]["protocols"][1] != entries[1]["protocols"][1]
    assert entries[1]["selected"] == "progress-relay.v1"


def test_query_transport_on_request(browser, page_server, relay_factory):
    relay = relay_factory()
    token = relay.token(topics=["job:*"])
    open_harness(browser, page_server)
    browser.execute_script(
        "return window.harness.start(arguments[0], {token: arguments[1], topics: ['job:q'],"
        " options: {tokenTransport: 'query'}})", relay.url, token)
    wait_js(browser, "window.harness.log.statuses.length === 1", 10, "the subscription")
    relay.emit_lines([{"topic": "job:q", "type": "progress", "progress": 50, "i": 1}])
    wait_js(browser, "window.harness.log.events.length === 1", 10, "the event")
    assert events_of(browser, "job:q")[0]["event"]["progress"] == 50
    [entry] = opened(browser)
    assert entry["url"] == relay.url + "?token=" + token, entry["url"]
    assert entry["protocols"] is None and entry["selected"] == ""


def test_unknown_transport_and_a_token_no_subprotocol_can_hold(browser, page_server, relay_factory):
    relay = relay_factory()
    open_harness(browser, page_server)
    # start() constructs the client, which refuses an unknown transport
    error = browser.execute_script(
        "try { window.harness.start(arguments[0], {token: 'x', options: {tokenTransport: 'header'}}); return null }"
        " catch (e) { return e.name + ': ' + e.message }", relay.url)
    assert error and error.startswith("TypeError") and "tokenTransport" in error, error
    # a token with a space cannot be a subprotocol name: the client says so and stops
    browser.execute_script(
        "return window.harness.start(arguments[0], {token: 'not a jwt', topics: ['a']})", relay.url)
    wait_js(browser, "window.harness.log.errors.length === 1", 5, "the error")
    [err] = harness_log(browser)["errors"]
    assert err["fatal"] and err["code"] == "unauthorized" and "subprotocol" in err["message"], err
    time.sleep(0.2)
    assert opened(browser) == []
