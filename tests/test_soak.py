"""Load and faults, short enough for CI, on one throwaway appliance: simulated annotators click and submit, first
without faults (not one request may fail), then while every supervised program is killed with -9 in turn.
supervisord must bring each back and no acknowledged annotation may be lost (Label Studio's count == acknowledged ==
journal). The long soak is the same script with larger numbers."""

from __future__ import annotations

import subprocess
import sys

from harness import ROOT


def test_load_has_no_errors_and_killing_each_program_loses_nothing(artifacts):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "soak.py"), "--start", "--annotators", "2",
                           "--calm", "20", "--seconds", "20"], capture_output=True, text=True, cwd=ROOT, timeout=900)
    (artifacts / "soak.txt").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    calm, faults = proc.stdout.split("## load while each program is killed")
    rows = [line.split("|") for line in calm.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip() in ("open task", "sam click", "submit")]
    assert len(rows) == 3 and all(int(row[2]) > 0 and int(row[3]) == 0 for row in rows), calm
    assert "no errors without faults: PASS" in calm
    assert faults.count("lost-annotation check: PASS") == 1 and "NOT recovered" not in faults, faults
