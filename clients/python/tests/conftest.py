"""pytest configuration of the Python client tests: the fixtures are in prfixtures.py."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prfixtures import *  # noqa: E402,F401,F403
