"""Fixtures for the progress-relay end-to-end suite.

Every test gets its own relay process(es) in its own temporary directory. The helpers the tests
call (Relay, ws_connect, recv_json, RawWS, ...) live in relaylib.py, next to this file.

The relay binary is `.build/debug/progress-relay` of this repository, or $PROGRESS_RELAY_BIN.
When a test fails, the standard error of every relay it started is attached to its report.
"""

from __future__ import annotations

import sys

import pytest

import relaylib
from relaylib import Relay


def pytest_report_header(config):
    return f"progress-relay binary: {relaylib.relay_bin()}"


@pytest.fixture(autouse=True)
def _relay_registry():
    relaylib._STARTED.clear()
    if "redislib" in sys.modules:
        sys.modules["redislib"]._STARTED.clear()
    yield
    # cleanup happens in relay_factory; the list is read by the report hook


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and rep.when in ("setup", "call"):
        for r in relaylib._STARTED:
            rep.sections.append((f"{r.name} stderr", r.log_tail()))
            try:
                out = r.stdout_path.read_text(errors="replace")
            except OSError:
                out = ""
            if out:
                rep.sections.append((f"{r.name} stdout", out[-5000:]))
        # redis-servers of the cluster tests (redislib), when that module is in use
        redislib = sys.modules.get("redislib")
        for s in getattr(redislib, "_STARTED", ()):
            rep.sections.append((f"{s.name} log", s.log_tail()))


@pytest.fixture
def relay_factory():
    """make(*extra_args, env=None, start=True, name=None, secret=None, workdir=None, flags=True).

    Each relay gets its own short temporary directory (Unix socket paths are limited to 107
    bytes), is started and waited for (GET /healthz = 200 and the socket file exists), and is
    stopped (SIGTERM, SIGKILL after 10 s) and removed at teardown."""
    made: list[Relay] = []

    def make(*extra_args, env=None, start=True, name=None, secret=None, workdir=None,
             flags=True) -> Relay:
        r = Relay(extra_args, env=env, secret=secret, workdir=workdir, flags=flags,
                  name=name or (f"relay{len(made) + 1}" if made else "relay"))
        made.append(r)
        if start:
            r.start()
        return r

    yield make
    for r in made:
        r.cleanup()


@pytest.fixture
def relay(relay_factory) -> Relay:
    """A relay with the default flags (plus --log-level debug)."""
    return relay_factory()
