"""Helpers shared by the browser tests: a resilient emitter, the module harness, the live page."""

from __future__ import annotations

import json
import socket
import threading
import time

from selenium.webdriver.common.by import By


def wait_js(driver, script: str, timeout: float = 10.0, what: str | None = None, interval: float = 0.05):
    """Polls `return <script>` until it is truthy; returns that value."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = driver.execute_script("return " + script)
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or script!r} (last value {last!r})")
        time.sleep(interval)


def emit_one(socket_path: str, event: dict, deadline_s: float = 20.0) -> None:
    """Writes one event line on its own connection, as an emitter library does when the relay
    may be restarting: the line counts as taken when the relay read to our end-of-file and
    closed (it answers only bad lines); when connecting or writing fails, or the connection is
    reset (it sat in the backlog of a relay that went away), the whole line is sent again on a
    new connection."""
    line = (json.dumps(event, separators=(",", ":")) + "\n").encode()
    deadline = time.monotonic() + deadline_s
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect(socket_path)
            s.sendall(line)
            s.shutdown(socket.SHUT_WR)
            answer = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                answer += chunk
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.03)
            continue
        finally:
            s.close()
        assert not answer, f"the relay rejected {line!r}: {answer!r}"
        return


class Emitter(threading.Thread):
    """Emits events[i] every `interval` seconds in a thread; `sent` counts lines written."""

    def __init__(self, socket_path: str, events: list[dict], interval: float):
        super().__init__(daemon=True)
        self.socket_path = socket_path
        self.events = events
        self.interval = interval
        self.sent = 0
        self.error: BaseException | None = None

    def run(self):
        try:
            for event in self.events:
                emit_one(self.socket_path, event)
                self.sent += 1
                time.sleep(self.interval)
        except BaseException as e:  # reported by finish()
            self.error = e

    def finish(self, timeout: float = 60):
        self.join(timeout)
        assert not self.is_alive(), "the emitter did not finish"
        if self.error:
            raise self.error


def open_harness(browser, page_server):
    browser.get(page_server.base + "/tests/pages/module.html")
    wait_js(browser, "window.harnessReady === true", 10, "the harness page to load")


def harness_log(browser) -> dict:
    return browser.execute_script("return window.harness.log")


def events_of(browser, sub: str) -> list[dict]:
    return browser.execute_script(
        "return window.harness.log.events.filter(e => e.sub === arguments[0])", sub)


def states(browser) -> list[str]:
    return [s["state"] for s in harness_log(browser)["states"]]


# --------------------------------------------------------------------------------------------
# the live page

def row_info(browser, topic: str) -> dict | None:
    """What a person sees in the row of `topic`, read from the DOM."""
    return browser.execute_script(
        """
        const tr = [...document.querySelectorAll('#rows tr')].find(r => r.dataset.topic === arguments[0]);
        if (!tr) return null;
        const bar = tr.querySelector('[role=progressbar]');
        const fill = bar.querySelector('.fill');
        return {
          state: tr.dataset.state, seq: tr.dataset.seq, count: tr.dataset.count,
          epoch: tr.dataset.epoch, resets: tr.dataset.resets,
          topic: tr.querySelector('td.topic').textContent,
          valuenow: bar.getAttribute('aria-valuenow'), valuetext: bar.getAttribute('aria-valuetext'),
          label: document.getElementById(bar.getAttribute('aria-labelledby')).textContent,
          ratio: fill.getBoundingClientRect().width / bar.getBoundingClientRect().width,
          pct: tr.querySelector('.pct').textContent,
          status: tr.querySelector('td.status span').textContent,
          message: tr.querySelector('td.message').textContent,
          events: [...tr.querySelectorAll('ol.events li')].map(li => li.textContent),
        };
        """, topic)


def wait_row(browser, topic: str, pred, timeout: float = 10, what: str = ""):
    deadline = time.monotonic() + timeout
    info = None
    while time.monotonic() < deadline:
        info = row_info(browser, topic)
        if info is not None and pred(info):
            return info
        time.sleep(0.05)
    raise AssertionError(f"row {topic}: {what or 'condition'} not met within {timeout}s; row: {info}")


def connection_text(browser) -> str:
    return browser.find_element(By.ID, "connection").text


def console_errors(browser) -> list[dict]:
    return [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
