"""Helpers shared by the browser tests: events and their checks, a resilient emitter, an nginx
that refuses WebSocket upgrades, the module harness, the live page."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

from selenium.webdriver.common.by import By

CLIENT_DIR = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# events

def progress(topic: str, i: int, n: int) -> dict:
    """Event i of n of `topic` (a progress event that also carries `i`, for the checks)."""
    return {"topic": topic, "type": "progress", "progress": round(100 * i / n, 2), "current": i,
            "total": n, "message": f"step {i}/{n}", "i": i}


def assert_exactly_once(events: list[dict], n: int, sub: str):
    """The harness's events of one subscription are `progress` 1..n, each once, in order."""
    got = [e["event"]["i"] for e in events]
    assert got == list(range(1, n + 1)), f"{sub}: expected i = 1..{n} once each, in order; got {got}"
    seqs = [e["event"]["seq"] for e in events]
    assert seqs == list(range(1, n + 1)), f"{sub}: seqs {seqs}"


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


# --------------------------------------------------------------------------------------------
# a proxy that refuses WebSocket upgrades

def no_upgrade_nginx(relay_port: int, static: bool = False):
    """A started nginxlib.Nginx in front of the relay on `relay_port`: /ws answers 403 (no
    upgrade reaches the relay), /sse is proxied unbuffered, everything else (/ticket, /healthz,
    /) as it is; requests are logged to `<dir>/access.log`. static: nginx serves `/` (live.html)
    and `/progress-relay.js` from clients/js itself, so that the page runs the client as it is
    in the tree, whatever the relay binary embeds. The caller cleans it up."""
    import nginxlib  # Tests/EndToEnd, on sys.path (conftest.py, scripts/screenshots)

    ngx = nginxlib.Nginx()
    files = ""
    if static:
        files = f"""
        location = / {{ root {CLIENT_DIR}; try_files /live.html =404; types {{ }} default_type text/html; }}
        location = /progress-relay.js {{ root {CLIENT_DIR}; types {{ }} default_type text/javascript; }}"""
    upstream = f"http://127.0.0.1:{relay_port}"
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
    try:
        return ngx.start()
    except BaseException:
        ngx.cleanup()
        raise


# --------------------------------------------------------------------------------------------
# the module's test page

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
