"""progress-relay.d.ts type-checks, and describes what the README's examples use (tsc from
Debian's node-typescript; skipped without it)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(shutil.which("tsc") is None, reason="tsc not installed (apt-get install node-typescript)")
def test_declarations_type_check():
    result = subprocess.run(
        ["tsc", "--noEmit", "--strict", "--target", "es2020", "--lib", "es2020,dom", "--moduleResolution", "node",
         str(HERE / "typecheck" / "use.ts"), str(HERE.parent / "progress-relay.d.ts")],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
