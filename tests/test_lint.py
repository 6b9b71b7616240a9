"""The code stays clean by the repository's ruff configuration (pyproject.toml: pycodestyle, pyflakes, bugbear)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from harness import ROOT


def test_ruff_finds_nothing():
    ruff = Path(sys.executable).parent / "ruff"
    done = subprocess.run([str(ruff), "check", "--no-cache", "appliance", "tests", "benchmarks", "scripts"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
