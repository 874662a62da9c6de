"""The live page the relay serves at `/` (clients/js/live.html, embedded in the binary), in
headless Chromium. Every test saves a screenshot in test-output/clients-js/<test>/."""

from __future__ import annotations

import re
import time
import urllib.parse
from pathlib import Path

from selenium.webdriver.common.by import By

from jshelpers import Emitter, connection_text, console_errors, row_info, wait_js, wait_row


def dev_relay(relay_factory):
    """`serve --dev` on a free loopback port, with the ingest socket in its own folder."""
    relay = relay_factory(start=False, flags=False, name="dev")
    relay.extra_args = ["--dev", "--listen", f"127.0.0.1:{relay.port}", "--socket", relay.socket_path,
                        "--log-level", "debug"]
    relay.start()
    deadline = time.monotonic() + 10
    while True:   # the banner may come a moment after /healthz answers
        out = relay.stdout_path.read_text()
        urls = re.findall(r"page:\s+(\S+)\n", out)
        if urls or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert urls, f"--dev printed no page URL within 10 s:\n{out}"
    return relay, urls[0]


# ---------------------------------------------------------------------------------------------

def test_dev_url_opens_the_page_authorised_and_shows_progress(browser, relay_factory, output_dir):
    relay, page_url = dev_relay(relay_factory)
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(page_url).query)
    assert page_url.startswith(f"http://127.0.0.1:{relay.port}/?token=") and query["token"], page_url
    relay.emit_lines([
        {"topic": "task:7", "type": "progress", "progress": 42, "current": 21, "total": 50,
         "message": "resizing images", "status": "running"},
        {"topic": "task:8", "type": "progress", "progress": 10},
        {"topic": "task:8", "type": "complete", "success": True, "message": "report ready", "result": {"rows": 3}},
        {"topic": "task:9", "type": "progress", "progress": 64, "message": "uploading"},
        {"topic": "task:9", "type": "error", "error": "disk full", "details": {"free": 0}},
    ])
    browser.get("about:blank")   # a previous test's page may still be reconnecting to its stopped relay
    browser.get_log("browser")   # start the console afresh
    browser.get(page_url)

    wait_js(browser, "document.getElementById('connection').dataset.state === 'open'", 10, "the page to connect")
    assert connection_text(browser) == "Live"
    assert browser.find_element(By.ID, "transport").text == "over WebSocket"
    assert "token=" not in browser.current_url, "the token stays out of the address bar and history"
    assert browser.find_element(By.ID, "token-panel").is_displayed() is False
    assert "signed in as dev" in browser.find_element(By.ID, "who").text
    chips = [li.text.split("\n")[0].rstrip("×").strip() for li in browser.find_elements(By.CSS_SELECTOR, "#watching li")]
    assert chips == ["*"]

    row = wait_row(browser, "task:7", lambda r: r["valuenow"] == "42" and abs(r["ratio"] - 0.42) < 0.01,
                   what="a bar at 42 %")
    assert row["status"] == "running" and row["message"] == "resizing images", row
    assert row["pct"] == "42% (21/50)" and row["label"] == "task:7", row
    assert row["valuetext"].startswith("42%"), row
    assert row["events"] == ["#1 progress 42% resizing images"], row
    done = wait_row(browser, "task:8", lambda r: r["state"] == "complete" and r["ratio"] > 0.99)
    assert done["status"] == "complete" and done["message"] == "report ready" and done["valuenow"] == "100", done
    failed = wait_row(browser, "task:9", lambda r: r["state"] == "error")
    assert failed["status"] == "error" and failed["message"] == "disk full", failed
    # a pattern starts with each topic's newest event only: the error, without a progress
    assert failed["valuenow"] is None and failed["ratio"] == 0 and failed["events"] == ["#2 error disk full"], failed
    # running tasks first, finished ones after
    order = browser.execute_script("return [...document.querySelectorAll('#rows tr')].map(r => r.dataset.topic)")
    assert order == ["task:7", "task:8", "task:9"], order

    # live updates
    relay.emit_lines([{"topic": "task:7", "type": "progress", "progress": 73.5, "message": "almost"},
                      {"topic": "task:10", "type": "progress", "progress": 5, "message": "queued"}])
    row = wait_row(browser, "task:7", lambda r: r["valuenow"] == "73.5" and abs(r["ratio"] - 0.735) < 0.01,
                   what="the bar to move to 73.5 %")
    assert row["events"][:2] == ["#2 progress 73.5% almost", "#1 progress 42% resizing images"], row
    wait_row(browser, "task:10", lambda r: r["valuenow"] == "5")
    relay.emit_lines([{"topic": "task:10", "type": "error", "error": "worker lost"}])
    lost = wait_row(browser, "task:10", lambda r: r["state"] == "error")
    assert lost["valuenow"] == "5" and lost["message"] == "worker lost", lost   # the last progress stays, in red
    time.sleep(0.4)   # let the bar's transition end before the picture
    browser.save_screenshot(str(output_dir / "live-page.png"))
    assert (output_dir / "live-page.png").stat().st_size > 10_000
    assert console_errors(browser) == []


def test_token_entered_in_the_form(browser, relay_factory, output_dir):
    relay = relay_factory()
    browser.get(relay.http_base + "/")
    wait_js(browser, "document.getElementById('token-input') !== null", 10)
    assert browser.find_element(By.ID, "token-panel").is_displayed()
    assert connection_text(browser) == "Not connected"
    assert browser.switch_to.active_element.get_attribute("id") == "token-input"
    label = browser.find_element(By.CSS_SELECTOR, "label[for=token-input]")
    assert label.text == "Relay token (JWT)"
    browser.save_screenshot(str(output_dir / "token-form.png"))

    relay.emit_lines([{"topic": "task:1", "type": "progress", "progress": 30, "message": "working"},
                      {"topic": "other:1", "type": "progress", "progress": 50}])
    browser.find_element(By.ID, "token-input").send_keys(
        relay.token(sub="alice", topics=["task:*", "report:9", "task:1"]))
    browser.find_element(By.CSS_SELECTOR, "#token-form button[type=submit]").click()
    wait_js(browser, "document.getElementById('connection').dataset.state === 'open'", 10)
    wait_row(browser, "task:1", lambda r: r["valuenow"] == "30")
    relay.emit_lines([{"topic": "task:1", "type": "progress", "progress": 35, "message": "still working"}])
    row = wait_row(browser, "task:1", lambda r: r["valuenow"] == "35")
    time.sleep(0.2)
    row = row_info(browser, "task:1")   # watched twice (task:* and task:1): each event shows once
    assert row["count"] == "2" and row["events"] == ["#2 progress 35% still working", "#1 progress 30% working"], row
    waiting = wait_row(browser, "report:9", lambda r: True)      # a granted topic: a row before any event
    assert waiting["state"] == "waiting" and waiting["status"] == "waiting" and waiting["valuenow"] is None, waiting
    assert row_info(browser, "other:1") is None                # not granted, not shown

    # a topic the relay grants through --grant is not in the token: it can be added by hand
    browser.find_element(By.ID, "watch-input").send_keys("other:*")
    browser.find_element(By.CSS_SELECTOR, "#watch-form button[type=submit]").click()
    wait_js(browser, "document.getElementById('alert').textContent.includes('other:*')", 10,
            "the refusal to be shown")
    assert row_info(browser, "other:1") is None
    relay.emit_lines([{"topic": "report:9", "type": "complete", "success": False, "message": "no data"}])
    failed = wait_row(browser, "report:9", lambda r: r["state"] == "failed")
    assert failed["status"] == "complete (failed)" and failed["message"] == "no data", failed
    browser.save_screenshot(str(output_dir / "after-token.png"))


def test_expired_token_on_the_page_asks_for_a_new_one(browser, relay_factory, output_dir):
    relay = relay_factory()
    browser.get(relay.http_base + "/?token=" + relay.token(topics=["*"], exp_in=-10))
    wait_js(browser, "document.getElementById('connection').dataset.state === 'closed'", 10)
    alert = browser.find_element(By.ID, "alert").text
    assert "refused the token" in alert, alert
    assert browser.find_element(By.ID, "token-panel").is_displayed()
    browser.save_screenshot(str(output_dir / "expired.png"))


def test_relay_restart_mid_stream_page_shows_every_event_once(browser, relay_factory, output_dir):
    """The page watches `*`; a running task is also subscribed by name, so that after the relay
    restarts with its state file the page resumes it: every event once, in order, no gap."""
    relay = relay_factory(start=False)
    relay.extra_args += ["--state-file", str(relay.dir / "state")]
    relay.start()
    browser.get(relay.http_base + "/?token=" + relay.token(topics=["*"]))
    wait_js(browser, "document.getElementById('connection').dataset.state === 'open'", 10)
    n = 50
    events = [{"topic": "task:r", "type": "progress", "progress": 2 * i, "current": i, "total": n,
               "message": f"item {i}"} for i in range(1, n)]
    events.append({"topic": "task:r", "type": "complete", "success": True, "message": "all done"})
    emitter = Emitter(relay.socket_path, events, interval=0.04)
    emitter.start()
    wait_row(browser, "task:r", lambda r: int(r["count"] or 0) >= 12, what="the first events")
    followed = browser.execute_script("return [...window.progressRelayPage.followed.keys()]")
    assert followed == ["task:r"], followed
    assert relay.stop() == 0
    wait_js(browser, "document.getElementById('connection').dataset.state === 'connecting'", 5)
    reconnecting = connection_text(browser)
    time.sleep(0.3)
    relay.start()
    emitter.finish()
    row = wait_row(browser, "task:r", lambda r: r["state"] == "complete", timeout=20, what="the task to complete")
    time.sleep(0.5)
    row = row_info(browser, "task:r")
    assert row["seq"] == str(n) and row["count"] == str(n), f"{n} events expected exactly once: {row}"
    assert not any("missed" in e for e in row["events"]), row["events"]
    assert row["events"] == ["#50 complete ok all done", "#49 progress 98% item 49", "#48 progress 96% item 48",
                             "#47 progress 94% item 47", "#46 progress 92% item 46"], row["events"]
    assert connection_text(browser) == "Live"
    assert reconnecting.startswith("Reconnecting") or reconnecting == "Connecting…", reconnecting
    assert browser.execute_script("return window.progressRelayPage.followed.size") == 0   # finished: let go
    browser.save_screenshot(str(output_dir / "after-restart.png"))


def test_the_relay_serves_this_folders_files(relay_factory):
    """The binary embeds live.html and progress-relay.js: a binary built before they changed
    would test old files. (Rebuild with `swift build`.)"""
    relay = relay_factory()
    client_dir = Path(__file__).resolve().parent.parent
    for path, name, content_type in (("/", "live.html", "text/html"),
                                     ("/progress-relay.js", "progress-relay.js", "text/javascript")):
        status, headers, body = relay.http_full(path)
        assert status == 200, (path, status)
        assert headers["content-type"].startswith(content_type), headers
        assert body == (client_dir / name).read_text(), \
            f"{relay.bin} serves another {name} than {client_dir / name}: rebuild it (swift build)"
