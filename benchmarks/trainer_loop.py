"""The auto-trainer's loop, measured: from the Nth submitted annotation to the new model serving.

Starts the appliance on a temporary volume, imports generated shape photos, measures SAM click latency while
idle, submits N brush annotations through Label Studio's API, measures SAM clicks again while the training
runs, and prints the run's split (wait, dataset, train, evaluate, publish, swap) from the trainer's own clock.

    .venv/app/bin/python benchmarks/trainer_loop.py [--epochs 40] [--clicks 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from harness import Appliance, appliance_env  # noqa: E402
from test_trainer_service import N_TASKS, brush, import_shapes, shape_tasks, trainer_status  # noqa: E402


def sam_click_ms(app: Appliance, task: dict, label_config: str, n: int) -> list[float]:
    url = f"http://127.0.0.2:{app.env['APPLIANCE_SAM_PORT']}/predict"
    auth = ("labelstudio", app.secrets()["APPLIANCE_BACKEND_SECRET"])
    times = []
    for i in range(n + 1):
        point = {"type": "keypointlabels", "is_positive": True, "original_width": 512, "original_height": 512,
                 "value": {"x": 40 + i % 5, "y": 30 + i % 7, "keypointlabels": ["Person"]}}
        began = time.perf_counter()
        response = requests.post(url, auth=auth, timeout=120, json={
            "tasks": [task], "label_config": label_config, "params": {"context": {"result": [point]}}})
        response.raise_for_status()
        times.append((time.perf_counter() - began) * 1000)
        result = response.json()["results"][0]
        if not result.get("result"):
            raise RuntimeError(f"the SAM click gave no mask: {result.get('error')}")
    return times[1:]  # the first click may encode


def wait_sam_ready(app: Appliance, timeout: float = 300) -> None:
    url = f"http://127.0.0.2:{app.env['APPLIANCE_SAM_PORT']}/health"
    auth = ("labelstudio", app.secrets()["APPLIANCE_BACKEND_SECRET"])
    deadline = time.time() + timeout
    while not requests.get(url, auth=auth, timeout=5).json().get("ready"):
        if time.time() > deadline:
            raise TimeoutError("SAM did not load")
        time.sleep(0.5)


def p95(values: list[float]) -> float:
    return sorted(values)[max(0, int(round(0.95 * len(values))) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--clicks", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = appliance_env(Path(tmp) / "data", APPLIANCE_TRAIN_MIN_NEW=str(N_TASKS),
                            APPLIANCE_TRAIN_QUIET_SECONDS="86400", APPLIANCE_TRAIN_EPOCHS=str(args.epochs),
                            APPLIANCE_TRAIN_IMG_SIZE="192", APPLIANCE_LABEL_MAP="")
        app = Appliance(env=env, log_path=Path(tmp) / "appliance.log")
        app.start()
        try:
            project = app.api("GET", f"/api/projects/{app.state()['project_id']}").json()
            tasks = app.api("GET", f"/api/projects/{project['id']}/export",
                            params={"exportType": "JSON", "download_all_tasks": "true"}).json()
            astronaut = next(t for t in tasks if "astronaut" in next(iter(t["data"].values())))
            wait_sam_ready(app)
            idle = sam_click_ms(app, astronaut, project["label_config"], args.clicks)
            truth = import_shapes(app)
            shapes = shape_tasks(app, time.time() + 60)
            for name, task in shapes.items():
                app.api("POST", f"/api/tasks/{task['id']}/annotations",
                        json={"result": [brush(m) for m in truth[name]], "was_cancelled": False})
            submitted = time.time()
            while trainer_status(app).get("state") != "running":
                time.sleep(0.2)
            busy = sam_click_ms(app, astronaut, project["label_config"], args.clicks)
            while not trainer_status(app).get("last"):
                time.sleep(1)
            last = trainer_status(app)["last"]
            total = time.time() - submitted
        finally:
            app.stop()
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    print(f"\n| stage (N = {N_TASKS} annotations, {args.epochs} epochs at 192 px) | seconds |\n| --- | --- |")
    for stage, seconds in last.get("timings", {}).items():
        print(f"| {stage} | {seconds:.1f} |")
    print(f"| Nth annotation -> run finished (incl. re-prediction) | {total:.1f} |")
    print(f"\nresult: {last.get('result')} {last.get('version', '')} "
          f"candidate={json.dumps(last.get('candidate'))}")
    print("\n| SAM click through the backend (ms) | p50 | p95 |\n| --- | --- | --- |")
    print(f"| idle | {statistics.median(idle):.0f} | {p95(idle):.0f} |")
    print(f"| while training | {statistics.median(busy):.0f} | {p95(busy):.0f} |")
    print(f"\np95 ratio training/idle: {p95(busy) / p95(idle):.2f} (goal <= 2)")


if __name__ == "__main__":
    main()
