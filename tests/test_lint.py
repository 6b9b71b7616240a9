"""The code stays clean by the repository's ruff configuration (pyproject.toml: pycodestyle, pyflakes, bugbear), and
its layers stay layered by the import-linter contracts in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from harness import ROOT

BIN = Path(sys.executable).parent


def test_ruff_finds_nothing():
    done = subprocess.run([str(BIN / "ruff"), "check", "--no-cache", "appliance", "tests", "benchmarks", "scripts"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_import_layers_are_kept():
    done = subprocess.run([str(BIN / "lint-imports"), "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout and "KEPT" in done.stdout


def test_a_model_that_imports_settings_breaks_the_contract(tmp_path):
    """The contract is live: a models module reaching up to the settings is reported (on a copy of the package)."""
    import shutil

    copy = tmp_path / "src"
    shutil.copytree(ROOT / "appliance", copy / "appliance", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    (copy / "appliance" / "models" / "leak.py").write_text("from appliance.settings import Settings\n")
    done = subprocess.run([str(BIN / "lint-imports"), "--no-cache"], cwd=copy, capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(copy), "PATH": str(BIN)})
    assert done.returncode != 0 and "appliance.models.leak -> appliance.settings" in done.stdout, done.stdout
