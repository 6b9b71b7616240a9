"""Cold start: time from `appliance up` to "project ready with both ML backends connected".

Measures, in one run: a fresh volume, a restart on the same volume, and Label Studio's own first boot
(`label-studio start` on an empty data dir, to /health) for comparison. Prints a Markdown table.

    .venv/app/bin/python benchmarks/cold_start.py [--runs 1]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from harness import Appliance, appliance_env, free_port  # noqa: E402

from appliance import studio  # noqa: E402


def connected(app: Appliance) -> bool:
    pid = app.state().get("project_id")
    if not pid:
        return False
    backends = app.api("GET", f"/api/ml?project={pid}").json()
    return len(backends) == 2 and all(b["state"] == "CO" for b in backends)


def time_appliance(data_dir: Path, log: Path) -> tuple[float, float]:
    app = Appliance(env=appliance_env(data_dir), log_path=log)
    fresh = app.start()
    assert connected(app), "backends not connected after a fresh start"
    app.stop()
    restart = app.start()
    assert connected(app), "backends not connected after a restart"
    app.stop()
    return fresh, restart


def time_label_studio_first_boot(data_dir: Path) -> float:
    port = free_port()
    env = {"LABEL_STUDIO_BASE_DATA_DIR": str(data_dir), "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",
           "LABEL_STUDIO_COLLECT_ANALYTICS": "false", "PATH": "/usr/bin:/bin"}
    began = time.time()
    proc = subprocess.Popen([str(studio.studio_venv() / "bin" / "label-studio"), "start", "--no-browser",
                             "--port", str(port), "--username", "bench@example.com", "--password", "benchmark1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.time() - began < 600:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    return time.time() - began
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise TimeoutError("label-studio start did not answer /health in 600 s")
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    fresh, restart, own = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            f, r = time_appliance(Path(tmp) / f"volume{run}", Path(tmp) / f"appliance{run}.log")
            fresh.append(f)
            restart.append(r)
            own.append(time_label_studio_first_boot(Path(tmp) / f"ls{run}"))
    rows = [("appliance up, fresh volume -> project ready, both backends connected", fresh),
            ("appliance up, restart -> project ready, both backends connected", restart),
            ("label-studio start, fresh data dir -> /health (Label Studio alone)", own)]
    print(f"| measurement ({args.runs} run(s), seconds) | median | min | max |\n| --- | --- | --- | --- |")
    for name, values in rows:
        print(f"| {name} | {statistics.median(values):.1f} | {min(values):.1f} | {max(values):.1f} |")


if __name__ == "__main__":
    main()
