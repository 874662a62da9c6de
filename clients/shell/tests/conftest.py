"""The shell examples' tests use the Python client tests' helpers and fixtures (a real relay, a
WebSocket subscriber)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python" / "tests"))

from prfixtures import relay, relay_factory, pytest_runtest_makereport  # noqa: E402,F401
