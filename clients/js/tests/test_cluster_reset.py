"""Cluster mode (issue 13): when Redis loses a topic, the relay resets the stream of every live
subscriber with a second `subscribed` frame. The browser client and the live page, in headless
Chromium, against real relays started with `--redis` and a real redis-server that is restarted
without its data (`SHUTDOWN NOSAVE`): the topic's next event then comes in a new epoch, from
seq 1 again."""

from __future__ import annotations

import subprocess
import time

import pytest

import relaylib
from jshelpers import (connection_text, console_errors, emit_one, events_of, harness_log, open_harness,
                       progress, row_info, wait_js, wait_row)


def cluster_relay(relay_factory, redis, name="relay"):
    return relay_factory("--redis", redis.url, "--node-name", name, name=name)


def sent_subscribes(browser, topic: str) -> list[dict]:
    return [s["frame"] for s in harness_log(browser)["sent"]
            if isinstance(s["frame"], dict) and s["frame"].get("op") == "subscribe" and s["frame"].get("topic") == topic]


# ---------------------------------------------------------------------------------------------

def test_module_takes_the_new_epoch_of_a_reset_and_resumes_with_it(browser, page_server, relay_factory, redis):
    relay = cluster_relay(relay_factory, redis)
    open_harness(browser, page_server)
    browser.execute_script(
        "return window.harness.start(arguments[0], {token: arguments[1], topics: ['job:z'],"
        " options: {minDelay: 200, maxDelay: 1000}})", relay.url, relay.token(topics=["job:*"]))
    wait_js(browser, "window.harness.log.statuses.length === 1", 10, "the subscription")
    first = harness_log(browser)["statuses"][0]
    assert first["status"] == "subscribed" and first["epoch"], first
    old_epoch = first["epoch"]
    n = 7
    for i in (1, 2, 3):
        emit_one(relay.socket_path, progress("job:z", i, n))
    wait_js(browser, "window.harness.log.events.length === 3", 15, "the first three events")
    assert [e["event"]["seq"] for e in events_of(browser, "job:z")] == [1, 2, 3]

    # Redis forgets everything; the topic's next event starts a new epoch at seq 1.
    redis.restart_without_data()
    emit_one(relay.socket_path, progress("job:z", 4, n), deadline_s=30)
    wait_js(browser, "window.harness.log.statuses.some(s => s.status === 'reset')", 30, "the reset")
    wait_js(browser, "window.harness.log.events.length === 4", 10, "the event after the reset")

    log = harness_log(browser)
    resets = [s for s in log["statuses"] if s["status"] == "reset"]
    for reset in resets:
        assert reset["sub"] == "job:z" and reset["topic"] == "job:z" and reset["recovered"] is False, reset
    assert resets[0]["previousEpoch"] == old_epoch and resets[0]["previousSeq"] == 3, resets[0]
    new_epoch = resets[-1]["epoch"]
    assert new_epoch and new_epoch != old_epoch, resets
    # the subscription stays: no new subscribe was sent, no error, the connection never dropped
    assert len(sent_subscribes(browser, "job:z")) == 1
    assert [s["state"] for s in log["states"]] == ["connecting", "open"], log["states"]
    assert log["errors"] == []
    # The event of the new numbering is delivered although its seq (1) is one the old epoch had
    # already given: it is the newest state, after a reset.
    after = events_of(browser, "job:z")[-1]
    assert after["event"]["i"] == 4 and after["event"]["seq"] == 1, after
    assert after["info"]["gap"] is True, after
    # Redis lost the data: the new numbering stands at 0, and every event of it follows.
    assert resets[-1]["seq"] == 0, resets[-1]

    emit_one(relay.socket_path, progress("job:z", 5, n))
    wait_js(browser, "window.harness.log.events.length === 5", 10)
    five = events_of(browser, "job:z")[-1]
    assert (five["event"]["i"], five["event"]["seq"], five["info"]["gap"]) == (5, 2, False), five

    # A reconnect (the relay restarts) resumes in the new epoch from the last seq delivered.
    assert relay.stop() == 0
    relay.start()
    wait_js(browser, "window.harness.log.statuses.filter(s => s.status === 'subscribed').length === 2", 20,
            "the subscription to be made again")
    resume = sent_subscribes(browser, "job:z")
    assert resume[0] == {"op": "subscribe", "topic": "job:z"}, resume
    assert resume[-1] == {"op": "subscribe", "topic": "job:z", "epoch": new_epoch, "since": 2}, resume
    again = [s for s in harness_log(browser)["statuses"] if s["status"] == "subscribed"][-1]
    assert again["epoch"] == new_epoch and again["resumed"] is True and again["recovered"] is True, again
    emit_one(relay.socket_path, progress("job:z", 6, n))
    wait_js(browser, "window.harness.log.events.length === 6", 10)
    time.sleep(0.3)
    events = events_of(browser, "job:z")
    assert [e["event"]["i"] for e in events] == [1, 2, 3, 4, 5, 6], events
    assert [e["event"]["seq"] for e in events] == [1, 2, 3, 1, 2, 3], events
    assert [e["info"]["gap"] for e in events] == [False, False, False, True, False, False], events


@pytest.mark.parametrize("watch", ["topic", "pattern"])
def test_live_page_shows_a_reset_and_keeps_working(browser, relay_factory, redis, output_dir, watch):
    """`topic`: the page watches task:z by name (?topic=task:z). `pattern`: it watches the token's
    grant task:*, and follows the running task:z by name, which is the subscription the relay
    resets (a pattern has no epoch; it only gets the newest event)."""
    relay = cluster_relay(relay_factory, redis)
    # Leave the previous test's page first: it may still be reconnecting to that test's stopped
    # relay, and would log that refusal into this test's console.
    browser.get("about:blank")
    browser.get_log("browser")   # start the console afresh
    query = "?topic=task:z&" if watch == "topic" else "?"
    browser.get(relay.http_base + "/" + query + "token=" + relay.token(topics=["task:*"]))
    wait_js(browser, "document.getElementById('connection').dataset.state === 'open'", 10, "the page to connect")
    for pct in (10, 20, 30):
        emit_one(relay.socket_path, {"topic": "task:z", "type": "progress", "progress": pct, "message": f"at {pct}"})
    row = wait_row(browser, "task:z", lambda r: r["seq"] == "3" and r["valuenow"] == "30" and r["epoch"],
                   what="the first events")
    if watch == "pattern":
        assert browser.execute_script("return [...window.progressRelayPage.followed.keys()]") == ["task:z"]
    old_epoch = row["epoch"]
    assert old_epoch and row["resets"] is None, row

    redis.restart_without_data()
    emit_one(relay.socket_path, {"topic": "task:z", "type": "progress", "progress": 40, "message": "after reset"},
             deadline_s=30)
    row = wait_row(browser, "task:z", lambda r: r["valuenow"] == "40", timeout=30, what="the event after the reset")
    new_epoch = row["epoch"]
    assert new_epoch and new_epoch != old_epoch, row
    assert row["seq"] == "1" and row["count"] == "4" and int(row["resets"]) >= 1, row
    assert row["events"][:2] == ["#1 progress 40% after reset", f"⟲ stream reset: epoch {new_epoch}, seq 0"], row
    assert not any("missed" in e for e in row["events"]), row["events"]   # the reset line says it
    assert "#3 progress 30% at 30" in row["events"], row["events"]

    emit_one(relay.socket_path, {"topic": "task:z", "type": "progress", "progress": 50, "message": "going on"})
    row = wait_row(browser, "task:z", lambda r: r["valuenow"] == "50" and abs(r["ratio"] - 0.5) < 0.01,
                   what="the bar to move to 50 %")
    assert row["seq"] == "2" and row["count"] == "5" and row["events"][0] == "#2 progress 50% going on", row
    assert connection_text(browser) == "Live"
    chip = browser.execute_script("return document.querySelector('#watching li').dataset.status")
    assert chip == "subscribed", chip
    if watch == "pattern":   # still followed by name after the reset
        assert browser.execute_script("return [...window.progressRelayPage.followed.keys()]") == ["task:z"]
    time.sleep(0.4)   # let the bar's transition end before the picture
    browser.save_screenshot(str(output_dir / "after-reset.png"))
    assert console_errors(browser) == []
    assert row_info(browser, "task:z")["events"][0] == "#2 progress 50% going on"
