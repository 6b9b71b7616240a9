"""Prediction backend throughput: raw model inference, bulk pre-annotation, per-task latency, hot swap.

Starts the real appliance (`appliance up`, tests/harness.py) on a temporary volume and, in one run:

    (i)   trains a small RTMDet-Ins model here (tests/synthetic.py shapes, appliance.models.detection.train),
          publishes it into <data>/models (ModelRegistry) and waits for the backend to serve it; writes N
          generated 640x480 photos into <data>/images and re-runs the bootstrap so Label Studio imports them
    (ii)  raw inference: Detector(version dir).predict_batch on the decoded task images, images/s
    (iii) bulk pre-annotation: `appliance predict --all`, tasks/s, and the ratio bulk / raw (goal >= 0.8)
    (iv)  per-task latency through Label Studio: GET /api/tasks/{id} on tasks without predictions
          (Label Studio asks the backend on load), p50/p95
    (v)   hot swap during a stream: 2 threads POST /predict to the backend while a second version is published

and prints one Markdown table. Timings are never asserted.

    OMP_WAIT_POLICY=PASSIVE .venv/app/bin/python benchmarks/predict_throughput.py [--images 20]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # before torch loads

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
import requests  # noqa: E402

from harness import Appliance, appliance_env  # noqa: E402
from synthetic import make_dataset, make_image  # noqa: E402

from appliance.labelstudio.images import decode_image  # noqa: E402

CLASSES = ["circle", "rectangle"]
SUMMARY = re.compile(r"(\d+) task\(s\) pre-annotated with (\S+) in ([\d.]+) s \(([\d.]+)/s\); (\d+) already had it; "
                     r"(\d+) failed")


# --- the model ------------------------------------------------------------------------------------
def train_model(work: Path, img_size: int, epochs: int, detections: int, threads: int) -> tuple[Path, float]:
    """A small model (like tests/test_predict_service.py's tiny_models). Returns (model dir, seconds).

    A model trained for a few iterations scores every candidate about equally and far below any useful
    threshold, so the appliance runs with APPLIANCE_SCORE_THRESHOLD=0 and the model's config keeps its
    ``detections`` best candidates per image (max_per_img): every image then yields that many regions, about
    what a trained model finds on a photo, instead of none (threshold 0.3) or 100 (the config's default).
    """
    from appliance.models.detection.train import train

    began = time.monotonic()
    make_dataset(work / "shapes", 8, CLASSES, seed=3)
    with contextlib.redirect_stdout(sys.stderr):  # pycocotools prints; stdout carries only the table
        model = Path(train(work / "shapes", CLASSES, work / "model", epochs=epochs, batch_size=4,
                           img_size=img_size, threads=threads))
    config = model / "config.py"
    text, count = re.subn(r"max_per_img=\d+", f"max_per_img={detections}", config.read_text())
    if count == 0:
        raise RuntimeError(f"no max_per_img in {config}")
    config.write_text(text)
    return model, time.monotonic() - began


def write_photos(folder: Path, n: int, seed: int = 7) -> list[Path]:
    """``n`` generated 640x480 JPEGs (shapes of the model's classes on noise)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        image, _ = make_image(rng, len(CLASSES), (640, 480), n_objects=(2, 5))
        path = folder / f"synthetic_{i:03d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


# --- talking to the appliance ---------------------------------------------------------------------
class Bench:
    def __init__(self, app: Appliance):
        self.app = app
        self.url = f"http://127.0.0.2:{app.env['APPLIANCE_PREDICT_PORT']}"
        self.auth = ("labelstudio", app.secrets()["APPLIANCE_BACKEND_SECRET"])
        self.pid = app.state()["project_id"]

    def serving(self) -> str:
        return requests.get(f"{self.url}/health", auth=self.auth, timeout=10).json()["model_version"]

    def publish(self, model_dir: Path, timeout: float = 180) -> tuple[str, float]:
        """Publish into the registry and wait until the backend serves it. Returns (version, seconds)."""
        from appliance.models.registry import ModelRegistry

        began = time.monotonic()
        version = ModelRegistry(self.app.data_dir / "models").publish(model_dir, {"segm_mAP": 0.0})
        while self.serving() != version:
            if time.monotonic() - began > timeout:
                raise TimeoutError(f"the prediction backend did not serve {version} in {timeout} s")
            time.sleep(0.2)
        return version, time.monotonic() - began

    def tasks(self) -> list[dict]:
        # The export has no side effects; the Data Manager's task list would ask the backend for predictions.
        response = self.app.api("GET", f"/api/projects/{self.pid}/export",
                                params={"exportType": "JSON", "download_all_tasks": "true"})
        response.raise_for_status()
        return sorted(response.json(), key=lambda t: t["id"])

    def label_config(self) -> str:
        return self.app.api("GET", f"/api/projects/{self.pid}").json()["label_config"]

    def predictions(self) -> list[dict]:
        return self.app.api("GET", "/api/predictions", params={"project": self.pid}).json()

    def delete_predictions(self) -> int:
        doomed = self.predictions()
        for prediction in doomed:
            self.app.api("DELETE", f"/api/predictions/{prediction['id']}").raise_for_status()
        return len(doomed)

    def predict(self, tasks: list[dict], label_config: str) -> requests.Response:
        body = {"tasks": [{"id": t["id"], "data": t["data"]} for t in tasks], "label_config": label_config,
                "project": str(self.pid)}
        return requests.post(f"{self.url}/predict", json=body, auth=self.auth, timeout=600)

    def bootstrap(self) -> None:
        env = self.app.env | {"APPLIANCE_LOG_LEVEL": "WARNING"}
        done = subprocess.run([sys.executable, "-m", "appliance", "bootstrap"], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"re-running the bootstrap failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")

    def bulk(self, batch: int | None) -> tuple[re.Match, str]:
        argv = [sys.executable, "-m", "appliance", "predict", "--all"] + (["--batch", str(batch)] if batch else [])
        done = subprocess.run(argv, env=self.app.env, cwd=ROOT, capture_output=True, text=True, timeout=900)
        match = SUMMARY.search(done.stdout)
        if done.returncode != 0 or match is None:
            raise RuntimeError(f"`appliance predict --all` failed ({done.returncode}): "
                               f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
        return match, done.stdout


# --- measurements ---------------------------------------------------------------------------------
def raw_throughput(version_dir: Path, images: list[np.ndarray], batch: int, threads: int,
                   min_runs: int = 3, min_seconds: float = 15) -> tuple[float, int, int, float]:
    """Images/s of Detector.predict_batch over ``images`` (median of the runs), regions per image, runs and
    the mean mask area (pixels) of a region."""
    import torch

    from appliance.models.detection.model import Detector

    torch.set_num_threads(threads)
    detector = Detector(version_dir, device="auto", score_threshold=0.0, batch_size=batch)
    detector.predict_batch(images[:batch])  # warm-up
    rates, found, began = [], [], time.monotonic()
    while len(rates) < min_runs or (time.monotonic() - began < min_seconds and len(rates) < 10):
        start = time.perf_counter()
        found = detector.predict_batch(images)
        rates.append(len(images) / (time.perf_counter() - start))
    per_image = round(statistics.mean(len(f) for f in found)) if found else 0
    areas = [int(d.mask.sum()) for f in found for d in f if d.mask is not None]
    del detector
    return statistics.median(rates), per_image, len(rates), statistics.mean(areas) if areas else 0.0


def backend_throughput(bench: Bench, tasks: list[dict], label_config: str, batch: int) -> tuple[float, int]:
    """Tasks/s of the backend's POST /predict alone (batches like the bulk run, nothing stored)."""
    start, failed = time.perf_counter(), 0
    for i in range(0, len(tasks), batch):
        response = bench.predict(tasks[i:i + batch], label_config)
        response.raise_for_status()
        failed += sum("result" not in r for r in response.json()["results"])
    return len(tasks) / (time.perf_counter() - start), failed


def task_load_latency(bench: Bench, tasks: list[dict], version: str) -> tuple[list[float], int]:
    """Milliseconds of GET /api/tasks/{id} on tasks without predictions; how many came back with one."""
    times, predicted = [], 0
    for task in tasks:
        start = time.perf_counter()
        response = bench.app.api("GET", f"/api/tasks/{task['id']}")
        times.append((time.perf_counter() - start) * 1000.0)
        response.raise_for_status()
        predicted += any(p.get("model_version") == version for p in response.json().get("predictions", []))
    return times, predicted


def hot_swap(bench: Bench, task: dict, label_config: str, second: Path, seconds: float) -> dict:
    """2 threads stream POST /predict for ``seconds``; a new version is published a third of the way in."""
    seen: list[str] = []
    failures: list[str] = []
    latencies: list[float] = []
    lock, stop = threading.Lock(), threading.Event()

    def stream() -> None:
        session = requests.Session()
        body = {"tasks": [{"id": task["id"], "data": task["data"]}], "label_config": label_config,
                "project": str(bench.pid)}
        while not stop.is_set():
            start = time.perf_counter()
            try:
                response = session.post(f"{bench.url}/predict", json=body, auth=bench.auth, timeout=120)
                result = response.json()["results"][0] if response.ok else {}
                ok, why = response.ok and "result" in result, response.text[:200]
            except (requests.RequestException, ValueError, KeyError, IndexError) as error:
                ok, why, result = False, f"{type(error).__name__}: {error}", {}
            with lock:
                latencies.append((time.perf_counter() - start) * 1000.0)
                seen.append(result.get("model_version")) if ok else failures.append(why)

    threads = [threading.Thread(target=stream, daemon=True) for _ in range(2)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(seconds / 3)
    version, swap_s = bench.publish(second)
    time.sleep(max(0.0, seconds - (time.monotonic() - began)))
    stop.set()
    for thread in threads:
        thread.join(150)
    order = list(dict.fromkeys(seen))
    return {"requests": len(latencies), "failures": failures, "versions": Counter(seen), "order": order,
            "second": version, "swap_s": swap_s, "latencies": latencies, "seconds": time.monotonic() - began}


def loadavg() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20, help="generated 640x480 task images to import")
    parser.add_argument("--img-size", type=int, default=160, help="the model's training/inference size")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--detections", type=int, default=5, help="regions the model returns per image")
    parser.add_argument("--batch", type=int, default=4, help="APPLIANCE_PREDICT_BATCH and `predict --batch`")
    parser.add_argument("--threads", type=int, default=1, help="torch threads here and in the backend")
    parser.add_argument("--stream-seconds", type=float, default=20)
    parser.add_argument("--keep", action="store_true", help="keep the temporary volume and the appliance log")
    args = parser.parse_args(argv)
    began = time.monotonic()
    load_start = loadavg()
    tmp = Path(tempfile.mkdtemp(prefix="predict-throughput-"))
    # The SAM backend's prefetch is off: its encoder would otherwise compete for the CPUs in the background.
    env = appliance_env(tmp / "data", APPLIANCE_SCORE_THRESHOLD="0.0", APPLIANCE_SAM_PREFETCH="0",
                        APPLIANCE_LABEL_MAP="circle:Object,rectangle:Object",
                        APPLIANCE_PREDICT_BATCH=str(args.batch), APPLIANCE_TORCH_THREADS=str(args.threads))
    app = Appliance(env=env, log_path=tmp / "appliance.log")
    try:
        # (i) the appliance boots while the model trains (nothing is timed meanwhile)
        boot: dict = {}
        starter = threading.Thread(target=lambda: boot.update(seconds=app.start()), daemon=True)
        starter.start()
        model, train_s = train_model(tmp / "work", args.img_size, args.epochs, args.detections, args.threads)
        starter.join(480)
        if "seconds" not in boot:
            raise RuntimeError("the appliance did not start")
        bench = Bench(app)
        write_photos(app.data_dir / "images", args.images)
        bootstrap_began = time.monotonic()
        bench.bootstrap()
        bootstrap_s = time.monotonic() - bootstrap_began
        tasks = bench.tasks()
        label_config = bench.label_config()
        first, publish_s = bench.publish(model)
        version_dir = app.data_dir / "models" / "versions" / first
        by_name = {p.name: p for p in (app.data_dir / "images").iterdir()}
        images = [decode_image(by_name[str(t["data"]["image"]).rsplit("/", 1)[-1].rsplit("=", 1)[-1]].read_bytes(),
                               10**9) for t in tasks]
        sizes = Counter(f"{im.shape[1]}x{im.shape[0]}" for im in images)
        # (ii) raw inference, in this process while the appliance idles
        raw, regions, raw_runs, mask_area = raw_throughput(version_dir, images, args.batch, args.threads)
        # the backend's /predict alone (fetch + decode + inference + masks to RLE), nothing stored
        direct, direct_failed = backend_throughput(bench, tasks, label_config, args.batch)
        # (iii) bulk pre-annotation through the CLI
        already = len(bench.predictions())
        summary, _ = bench.bulk(args.batch)
        bulk_n, bulk_version, bulk_s, bulk_rate = (int(summary[1]), summary[2], float(summary[3]),
                                                    float(summary[4]))
        stored = sum(p.get("model_version") == first for p in bench.predictions())
        # (iv) per-task latency through Label Studio, on tasks whose predictions were just deleted
        deleted = bench.delete_predictions()
        load_ms, loaded = task_load_latency(bench, tasks, first)
        # (v) hot swap during a stream
        synthetic = next(t for t in tasks if "synthetic_" in str(t["data"]["image"]))
        swap = hot_swap(bench, synthetic, label_config, model, args.stream_seconds)
    except Exception:
        tail = app.log_text()[-4000:] if app.log_path.exists() else ""
        print(f"failed; appliance log tail ({app.log_path}):\n{tail}", file=sys.stderr)
        args.keep = True
        raise
    finally:
        if app.proc and app.proc.poll() is None:
            app.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"volume and log kept in {tmp}", file=sys.stderr)

    p50, p95 = np.percentile(load_ms, 50), np.percentile(load_ms, 95)
    s50, s95 = np.percentile(swap["latencies"], 50), np.percentile(swap["latencies"], 95)
    ratio = bulk_rate / raw if raw else 0.0
    versions = ", ".join(f"{v}: {swap['versions'][v]}" for v in swap["order"])
    in_order = swap["order"] == [first, swap["second"]]
    masks = (f"mean mask area {mask_area:.0f} px" if mask_area else "the barely trained model's masks are empty, "
             "so encoding real masks to RLE costs a little more")
    size_list = ", ".join(f"{n} x {s}" for s, n in sizes.most_common())
    print(f"## Prediction backend throughput (RTMDet-Ins-tiny at {args.img_size} px, CPU, "
          f"{args.threads} torch thread(s))\n")
    print(f"- machine: {os.cpu_count()} CPU(s); load average (1/5/15 min) at start {load_start}, at end {loadavg()}; "
          f"OMP_WAIT_POLICY=PASSIVE; SAM prefetch off (APPLIANCE_SAM_PREFETCH=0)")
    print(f"- {len(tasks)} tasks: 5 sample photos + {args.images} generated 640x480 JPEGs ({size_list}); "
          f"{regions} region(s) per image (score threshold 0, max_per_img={args.detections}), each a brush mask "
          f"and a box ({masks}); batch {args.batch}\n")
    print("| measurement | result | goal |\n| --- | --- | --- |")
    print(f"| (i) model: {args.epochs} epoch(s) on 8 synthetic images at {args.img_size} px; appliance up | "
          f"trained in {train_s:.0f} s (beside a {boot['seconds']:.0f} s boot); published {first}, served after "
          f"{publish_s:.1f} s; {args.images} images imported by a re-run bootstrap in {bootstrap_s:.0f} s | |")
    print(f"| (ii) raw inference: Detector.predict_batch on the {len(images)} decoded images | "
          f"{raw:.2f} images/s = {1000 / raw:.0f} ms/image (median of {raw_runs} runs) | |")
    print(f"| backend POST /predict alone (fetch, decode, inference, masks to RLE; nothing stored) | "
          f"{direct:.2f} tasks/s = {1000 / direct:.0f} ms/task ({direct_failed} failed) | |")
    print(f"| (iii) bulk: `appliance predict --all --batch {args.batch}` | {bulk_n} task(s) with {bulk_version} in "
          f"{bulk_s:.1f} s = {bulk_rate:.2f} tasks/s = {1000 / bulk_rate:.0f} ms/task ({already} predictions "
          f"existed before, {stored} stored after) | |")
    print(f"| (iii) bulk / raw | {ratio:.3f} | >= 0.8: {'met' if ratio >= 0.8 else 'not met'} |")
    print(f"| (iv) GET /api/tasks/{{id}} without predictions (Label Studio asks the backend) | p50 {p50:.0f} ms, "
          f"p95 {p95:.0f} ms (n={len(load_ms)}; {loaded} came back with a {first} prediction; {deleted} "
          f"predictions deleted first) | |")
    print(f"| (v) hot swap: 2 threads POST /predict (1 task) for {swap['seconds']:.0f} s, {swap['second']} "
          f"published a third in | {swap['requests']} requests, {len(swap['failures'])} failed; versions seen "
          f"in order: {versions}; swap served {swap['swap_s']:.1f} s after publish; latency p50 {s50:.0f} ms, "
          f"p95 {s95:.0f} ms, max {max(swap['latencies']):.0f} ms | 0 failures: "
          f"{'met' if not swap['failures'] and in_order else 'not met'} |")
    for failure in swap["failures"][:5]:
        print(f"- hot-swap failure: {failure}")
    print(f"\nThe second version holds the same weights as the first (a new registry version; the swap loads it "
          f"beside the old one either way). total runtime {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()
