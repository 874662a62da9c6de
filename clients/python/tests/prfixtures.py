"""Fixtures and report hooks shared by the Python and shell client tests (their conftest.py files
import everything from here): real relay processes, real sockets."""

from __future__ import annotations

import contextlib

import prhelpers
import pytest
import relaylib  # on sys.path through prhelpers
from prhelpers import Relay

__all__ = ["pytest_report_header", "pytest_runtest_makereport", "relay_factory", "relay"]


def pytest_report_header(config):
    try:
        return f"progress-relay binary: {prhelpers.relay_bin()}"
    except RuntimeError as e:
        return str(e)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)
    if rep.failed and rep.when in ("setup", "call"):
        for r in relaylib._STARTED:   # every relay made since relay_factory last began
            rep.sections.append(("relay stderr", r.log_tail(20000)))


@pytest.fixture
def relay_factory():
    """make(*extra_args, start=True, socket_path=None, directory=None) -> Relay; stopped and
    removed at the end."""
    relaylib._STARTED.clear()
    with contextlib.ExitStack() as made:
        def make(*extra_args, start=True, socket_path=None, directory=None):
            r = Relay(*extra_args, socket_path=socket_path, directory=directory)
            made.callback(r.cleanup)
            return r.start() if start else r

        yield make


@pytest.fixture
def relay(relay_factory):
    return relay_factory()
