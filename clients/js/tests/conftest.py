"""Fixtures for the browser tests of clients/js.

Headless Chromium (Debian's `chromium`, driven by `chromium-driver` through selenium) against
real `progress-relay` processes. The relay helpers (start, restart, tokens, ingest) are the
end-to-end suite's, Tests/EndToEnd/relaylib.py: as there, when the tests run as root each relay
runs unprivileged (relaylib.RELAY_UID:RELAY_GID, no capabilities; the browser keeps root).

- `browser`: one Chromium for the whole run; each test loads its own page.
- `page_server`: a loopback HTTP server for the module's test page: it serves clients/js
  (so the page imports /progress-relay.js, the file under test) and mints tokens at
  /token?ttl=S&topics=A,B&sub=U with the secret of the relay it is pointed at.
- `relay_factory`: relays in their own temporary directories, stopped at teardown.
- `redis`: a redis-server of the test's own on a Unix socket in a temporary directory (cluster
  mode, issue 13), which can be restarted without its data; killed at teardown.
- `output_dir`: test-output/clients-js/<test> at the repository root, for screenshots; on a
  failure the page's screenshot, its console and the relays' logs land there and in the report.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CLIENT_DIR = HERE.parent
REPO = CLIENT_DIR.parent.parent
sys.path.insert(0, str(REPO / "Tests" / "EndToEnd"))

import relaylib  # noqa: E402
from relaylib import Relay  # noqa: E402
from jshelpers import wait_js  # noqa: E402,F401

OUTPUT_ROOT = REPO / "test-output" / "clients-js"
CHROMIUM = os.environ.get("CHROMIUM_BIN") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = os.environ.get("CHROMEDRIVER_BIN") or shutil.which("chromedriver") or "/usr/bin/chromedriver"


def pytest_report_header(config):
    return [f"progress-relay binary: {relaylib.relay_bin()}", f"chromium: {CHROMIUM}, driver: {CHROMEDRIVER}"]


# --------------------------------------------------------------------------------------------
# the browser

@pytest.fixture(scope="session")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            pytest.fail(f"{path} not found: install Debian's {package} (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",                      # tests run as root in CI
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        "--disable-background-timer-throttling",
        "--disable-renderer-backgrounding",
        "--no-first-run",
        "--disable-extensions",
        "--disable-gpu",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


# --------------------------------------------------------------------------------------------
# the test pages' server

class _PageHandler(SimpleHTTPRequestHandler):
    server: "PageServer"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, directory=str(CLIENT_DIR), **kwargs)

    def end_headers(self):
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def guess_type(self, path):
        if str(path).endswith(".js"):
            return "text/javascript"
        return super().guess_type(path)

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/token":
            return self._token(urllib.parse.parse_qs(url.query))
        return super().do_GET()

    def _token(self, query):
        relay = self.server.relay
        if relay is None or self.server.refuse_tokens:
            self.send_error(503, "no token now")
            return
        ttl = float(query.get("ttl", ["3600"])[0])
        topics = [t for t in query.get("topics", ["*"])[0].split(",") if t]
        sub = query.get("sub", ["u1"])[0]
        token = relay.token(sub=sub, topics=topics, exp_in=ttl)
        self.server.tokens_minted += 1
        body = token.encode()
        content_type = "text/plain"
        if query.get("shape", [""])[0] == "json":
            # The token endpoint's documented answer: JSON with the token in `token`.
            body = json.dumps({"topic": topics[0] if topics else None, "url": relay.url,
                               "token": token}).encode()
            content_type = "application/json"
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


class PageServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _PageHandler)
        self.relay: Relay | None = None
        self.refuse_tokens = False
        self.tokens_minted = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture(scope="session")
def _page_server_session():
    server = PageServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def page_server(_page_server_session):
    server = _page_server_session
    server.relay = None
    server.refuse_tokens = False
    server.tokens_minted = 0
    yield server
    server.relay = None


# --------------------------------------------------------------------------------------------
# relays

@pytest.fixture
def relay_factory():
    """make(*extra_args, name=None, start=True) -> relaylib.Relay, stopped and removed at teardown."""
    made: list[Relay] = []

    def make(*extra_args, name=None, start=True, **kwargs) -> Relay:
        r = Relay(extra_args, name=name or (f"relay{len(made) + 1}" if made else "relay"), **kwargs)
        made.append(r)
        if start:
            r.start()
        return r

    relaylib._STARTED.clear()
    yield make
    for r in made:
        r.cleanup()


# --------------------------------------------------------------------------------------------
# Redis, for cluster mode

REDIS_SERVER = os.environ.get("PROGRESS_RELAY_REDIS_SERVER") or shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


class RedisServer:
    """redis-server on a Unix socket in its own temporary directory, no persistence. The relays
    (the unprivileged relay user when the tests run as root) reach it: the directory is 0755 and
    the socket 0777. Redis runs as the test's user: it is the test's instrument."""

    def __init__(self):
        self.dir = relaylib.short_tmpdir("rd-")
        os.chmod(self.dir, 0o755)
        self.socket_path = str(self.dir / "redis.sock")
        self.log_path = self.dir / "redis.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        """The relay's `--redis` value."""
        return "unix://" + self.socket_path

    def cli(self, *args: str, timeout: float = 5) -> subprocess.CompletedProcess:
        return subprocess.run([REDIS_CLI, "-s", self.socket_path, *args], capture_output=True, text=True,
                              timeout=timeout)

    def start(self, timeout: float = 10) -> "RedisServer":
        self.starts += 1
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", "0", "--unixsocket", self.socket_path, "--unixsocketperm", "777",
             "--save", "", "--appendonly", "no", "--dir", str(self.dir), "--logfile", str(self.log_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"redis-server exited with {self.proc.returncode}:\n{self.log_tail()}")
            if os.path.exists(self.socket_path) and self.cli("PING").stdout.strip() == "PONG":
                return self
            if time.monotonic() > deadline:
                raise AssertionError(f"redis-server did not answer PING within {timeout} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def restart_without_data(self) -> "RedisServer":
        """`SHUTDOWN NOSAVE`, then a new server on the same socket: every topic is gone."""
        self.cli("SHUTDOWN", "NOSAVE")
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        return self.start()

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def log_tail(self, max_chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-max_chars:]
        except OSError:
            return "(no redis log)"


_REDIS_STARTED: list[RedisServer] = []


@pytest.fixture
def redis():
    """A started RedisServer. Its absence fails the test: .ci/run installs it, and a skipped
    cluster test would pass a client that mishandles resets."""
    if not (os.path.isfile(REDIS_SERVER) and os.access(REDIS_SERVER, os.X_OK) and os.access(REDIS_CLI, os.X_OK)):
        pytest.fail("redis-server/redis-cli not installed (apt-get install redis-server)")
    server = RedisServer()
    _REDIS_STARTED.append(server)
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)
        _REDIS_STARTED.remove(server)


# --------------------------------------------------------------------------------------------
# output: screenshots, and what a failure leaves behind

@pytest.fixture
def output_dir(request) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    path = OUTPUT_ROOT / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if not (rep.failed and rep.when in ("setup", "call")):
        return
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", item.name)
    folder = OUTPUT_ROOT / name
    folder.mkdir(parents=True, exist_ok=True)
    driver = item.funcargs.get("browser") if hasattr(item, "funcargs") else None
    if driver is not None:
        try:
            driver.save_screenshot(str(folder / "failure.png"))
            console = driver.get_log("browser")
            (folder / "console.json").write_text(json.dumps(console, indent=1))
            rep.sections.append(("browser console", "\n".join(str(e) for e in console[-100:])))
            log = driver.execute_script("return window.harness ? JSON.stringify(window.harness.log) : null")
            if log:
                (folder / "harness-log.json").write_text(log)
                rep.sections.append(("harness log (tail)", log[-6000:]))
        except Exception as e:  # the browser may be the thing that broke
            rep.sections.append(("browser", f"could not collect: {e!r}"))
    for server in _REDIS_STARTED:
        rep.sections.append(("redis log", server.log_tail()))
    for r in relaylib._STARTED:
        rep.sections.append((f"{r.name} stderr", r.log_tail(8000)))
        try:
            shutil.copy(r.log_path, folder / f"{r.name}-stderr.log")
        except OSError:
            pass
