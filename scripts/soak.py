"""Soak test: N simulated annotators for T seconds while every supervised program is killed -9 in turn.

Each annotator loops: open a task, click with SAM (Label Studio's interactive endpoint), submit an annotation
(SAM's mask, or a box when SAM is down). Meanwhile a killer sends SIGKILL to each program's process group
(studio, sam, predict, train; pids from supervisord's XML-RPC socket) one after the other, waiting for each to
recover (supervisord shows it RUNNING with a new pid and, for a server, its /health answers) before the next.
The load runs for at least T seconds and until the last program recovered.

Reported: p50/p95 latency and error counts per endpoint, recovery time per program, and the lost-annotation
check: every annotation acknowledged (201) is in Label Studio, and every one there is in the journal (Label Studio may
also hold the few whose submit lost its answer to a killed program: stored once, never lost).

    python scripts/soak.py --start                       # a throwaway appliance on a temporary volume
    python scripts/soak.py --annotators 2 --seconds 30   # against the appliance the environment describes
    python scripts/soak.py --start --calm 20             # first 20 s without faults, where no request may fail

Against an existing appliance it ADDS annotations to its project: use a throwaway one. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
import xmlrpc.client
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = ("studio", "sam", "predict", "train")
MAX_ITERATIONS = 100_000  # per annotator: the deadline ends the loop long before
RECOVERY_LIMIT_S = 180.0


@dataclass
class Target:
    url: str
    token: str
    data_dir: Path
    sam_url: str
    predict_url: str
    backend_auth: tuple[str, str]

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Token {self.token}"}


@dataclass
class Stats:
    lock: threading.Lock = field(default_factory=threading.Lock)
    latency: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    error_kinds: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    submitted: set[int] = field(default_factory=set)
    sam_masks: int = 0

    def record(self, endpoint: str, seconds: float, ok: bool, kind: str = "") -> None:
        with self.lock:
            self.latency[endpoint].append(seconds)
            if not ok:
                self.errors[endpoint] += 1
                self.error_kinds[f"{endpoint}: {kind}"] += 1


# --- supervisord ----------------------------------------------------------------------------------
def supervisor(data_dir: Path):
    from supervisor.xmlrpc import SupervisorTransport

    transport = SupervisorTransport(None, None, serverurl=f"unix://{data_dir / 'run' / 'supervisor.sock'}")
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)


def process_info(data_dir: Path, name: str) -> dict:
    try:
        return supervisor(data_dir).supervisor.getProcessInfo(name)
    except (OSError, xmlrpc.client.Error):
        return {}


# --- one annotator --------------------------------------------------------------------------------
def annotator(target: Target, tasks: list[dict], sam_id: int, stats: Stats, stop: threading.Event,
              seed: int) -> None:
    rng = random.Random(seed)
    session = requests.Session()
    session.headers.update(target.headers())

    def timed(endpoint: str, method: str, path: str, **kwargs):
        began = time.monotonic()
        try:
            response = session.request(method, target.url + path, timeout=60, **kwargs)
        except requests.RequestException as error:
            stats.record(endpoint, time.monotonic() - began, False, type(error).__name__)
            return None
        ok = response.status_code < 400
        stats.record(endpoint, time.monotonic() - began, ok, "" if ok else f"HTTP {response.status_code}")
        return response

    for _ in range(MAX_ITERATIONS):
        if stop.is_set():
            return
        task = rng.choice(tasks)
        timed("open task", "GET", f"/api/tasks/{task['id']}")
        x, y = rng.uniform(20, 80), rng.uniform(20, 80)
        click = {"type": "keypointlabels", "from_name": "point", "to_name": "image", "original_width": 512,
                 "original_height": 512, "is_positive": True,
                 "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": ["Object"]}}
        answer = timed("sam click", "POST", f"/api/ml/{sam_id}/interactive-annotating",
                       json={"task": task["id"], "context": {"result": [click]}})
        regions = []
        if answer is not None and answer.ok:
            try:
                regions = answer.json().get("data", {}).get("result") or []
            except ValueError:
                regions = []
        if regions:
            with stats.lock:
                stats.sam_masks += 1
        else:  # SAM is down or said why: the annotator draws a box by hand
            regions = [{"type": "rectanglelabels", "from_name": "box", "to_name": "image", "original_width": 512,
                        "original_height": 512, "image_rotation": 0,
                        "value": {"x": x, "y": y, "width": 10, "height": 10, "rotation": 0,
                                  "rectanglelabels": ["Object"]}}]
        made = timed("submit", "POST", f"/api/tasks/{task['id']}/annotations",
                     json={"result": regions, "was_cancelled": False})
        if made is not None and made.status_code == 201:
            with stats.lock:
                stats.submitted.add(made.json()["id"])
        stop.wait(rng.uniform(0.2, 0.8))  # think time


# --- the killer -----------------------------------------------------------------------------------
def recovered(target: Target, name: str, old_pid: int) -> bool:
    info = process_info(target.data_dir, name)
    if info.get("statename") != "RUNNING" or info.get("pid") in (0, old_pid):
        return False
    try:
        if name == "studio":
            return requests.get(f"{target.url}/health", timeout=2).ok
        if name in ("sam", "predict"):
            url = target.sam_url if name == "sam" else target.predict_url
            health = requests.get(f"{url}/health", auth=target.backend_auth, timeout=2)
            return health.ok and (name != "sam" or bool(health.json().get("ready")))
    except (requests.RequestException, ValueError):
        return False
    return True


def killer(target: Target, programs: list[str], delay: float, results: dict, stop: threading.Event) -> None:
    stop.wait(delay)
    for name in programs:
        if stop.is_set():
            return
        pid = process_info(target.data_dir, name).get("pid") or 0
        if not pid:
            results[name] = {"error": "not running"}
            continue
        began = time.monotonic()
        try:
            os.killpg(pid, signal.SIGKILL)  # supervisord gives each program its own process group
        except ProcessLookupError:
            os.kill(pid, signal.SIGKILL)
        while time.monotonic() - began < RECOVERY_LIMIT_S and not recovered(target, name, pid):
            time.sleep(0.25)
        took = time.monotonic() - began
        results[name] = {"killed_pid": pid, "recovery_s": round(took, 1),
                         "recovered": took < RECOVERY_LIMIT_S}
        stop.wait(3)  # let the load settle before the next kill


# --- the lost-annotation check ----------------------------------------------------------------------
def studio_annotation_ids(target: Target, project_id: int) -> set[int]:
    tasks = requests.get(f"{target.url}/api/projects/{project_id}/export", headers=target.headers(), timeout=120,
                         params={"exportType": "JSON", "download_all_tasks": "true"}).json()
    return {a["id"] for t in tasks for a in t.get("annotations") or []}


def journal_annotation_ids(data_dir: Path) -> set[int]:
    found = set()
    for path in (data_dir / "journal").glob("*"):
        try:
            task = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        found.update(a["id"] for a in task.get("annotations") or [] if isinstance(a, dict) and "id" in a)
    return found


# --- report -------------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def report(stats: Stats, kills: dict, check: dict, seconds: float, annotators: int) -> str:
    lines = [f"soak: {annotators} annotator(s), {seconds:.0f} s of load", "",
             "| endpoint | requests | errors | p50 ms | p95 ms |", "| --- | --- | --- | --- | --- |"]
    for endpoint in ("open task", "sam click", "submit"):
        values = stats.latency.get(endpoint, [])
        lines.append(f"| {endpoint} | {len(values)} | {stats.errors.get(endpoint, 0)} | "
                     f"{percentile(values, 50) * 1000:.0f} | {percentile(values, 95) * 1000:.0f} |")
    lines += ["", f"SAM masks returned: {stats.sam_masks}", "", "| program killed (-9) | recovery s |",
              "| --- | --- |"]
    for name, result in kills.items():
        lines.append(f"| {name} | {result.get('recovery_s', result.get('error'))}"
                     f"{'' if result.get('recovered', True) else ' (NOT recovered)'} |")
    lines += ["", "errors by kind:"] + ([f"  {k}: {v}" for k, v in sorted(stats.error_kinds.items())] or ["  none"])
    lines += ["", f"annotations acknowledged (201): {check['submitted']}",
              f"in Label Studio: {check['studio']}   in the journal: {check['journal']}",
              f"lost (acknowledged, not in Label Studio): {check['lost_in_studio']}",
              f"missing from the journal: {check['missing_in_journal']}",
              f"in Label Studio but never acknowledged: {check['unacknowledged']} (allowed: as many as the submits "
              f"whose answer was lost, {stats.errors.get('submit', 0)})",
              f"lost-annotation check: {'PASS' if check['ok'] else 'FAIL'}"]
    return "\n".join(lines)


def run(target: Target, annotators: int, seconds: float, programs: list[str]) -> tuple[str, bool]:
    state = json.loads((target.data_dir / "state.json").read_text())
    project_id, sam_id = state["project_id"], state["ml_backends"]["sam"]
    tasks = requests.get(f"{target.url}/api/tasks", headers=target.headers(), timeout=60,
                         params={"project": project_id, "page_size": 100}).json()["tasks"]
    if not tasks:
        raise SystemExit("the project has no tasks to annotate")
    before_studio = studio_annotation_ids(target, project_id)
    before_journal = journal_annotation_ids(target.data_dir)
    stats, kills, stop = Stats(), {}, threading.Event()
    began = time.monotonic()
    workers = [threading.Thread(target=annotator, args=(target, tasks, sam_id, stats, stop, i), daemon=True)
               for i in range(annotators)]
    kill_thread = threading.Thread(target=killer, args=(target, programs, min(5.0, seconds / 5), kills, stop),
                                   daemon=True)
    for thread in workers + [kill_thread]:
        thread.start()
    kill_thread.join(seconds + len(programs) * (RECOVERY_LIMIT_S + 5))
    remaining = seconds - (time.monotonic() - began)
    if remaining > 0:
        time.sleep(remaining)
    stop.set()
    for thread in workers:
        thread.join(90)
    load_seconds = time.monotonic() - began
    time.sleep(3)  # the last journal writes
    studio_ids = studio_annotation_ids(target, project_id) - before_studio
    journal_ids = journal_annotation_ids(target.data_dir) - before_journal
    check = {"submitted": len(stats.submitted), "studio": len(studio_ids), "journal": len(journal_ids),
             "lost_in_studio": sorted(stats.submitted - studio_ids),
             "missing_in_journal": sorted(studio_ids - journal_ids),
             "unacknowledged": sorted(studio_ids - stats.submitted)}
    # A submit whose answer died with a killed program may have been stored all the same (at least once, never
    # lost): Label Studio may hold at most that many annotations nobody saw acknowledged.
    check["ok"] = not check["lost_in_studio"] and not check["missing_in_journal"] and \
        len(studio_ids) == len(journal_ids) and len(check["unacknowledged"]) <= stats.errors.get("submit", 0)
    text = report(stats, kills, check, load_seconds, annotators)
    if not programs:  # nothing was killed: a single failed request is a failure
        text += f"\nno errors without faults: {'FAIL' if stats.errors else 'PASS'}"
        return text, check["ok"] and not stats.errors
    return text, check["ok"] and all(k.get("recovered") for k in kills.values())


def session(target: Target, args: argparse.Namespace, programs: list[str]) -> tuple[str, bool]:
    """The calm phase (load, no faults, no error allowed) when asked for, then the load with its kills."""
    texts, ok = [], True
    if args.calm:
        text, ok = run(target, args.annotators, args.calm, [])
        texts.append("## load without faults\n\n" + text)
    if programs or not args.calm:
        text, faults_ok = run(target, args.annotators, args.seconds, programs)
        texts.append(("## load while each program is killed\n\n" if programs else "") + text)
        ok = ok and faults_ok
    return "\n\n".join(texts), ok


def target_from_env() -> Target:
    sys.path.insert(0, str(ROOT))
    from appliance.runtime import load

    settings = load()
    return Target(settings.studio_base_url, settings.secret("api_key"), settings.data, settings.sam_base_url,
                  settings.predict_base_url, settings.backend_credentials)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotators", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--programs", default=",".join(PROGRAMS), help="programs to kill, in order ('' for none)")
    parser.add_argument("--calm", type=float, default=0,
                        help="first this many seconds of load without faults, where any error fails the soak")
    parser.add_argument("--start", action="store_true", help="start a throwaway appliance on a temporary volume")
    args = parser.parse_args(argv)
    if not 1 <= args.annotators <= 64 or not 1 <= args.seconds <= 3600 or not 0 <= args.calm <= 3600:
        parser.error("--annotators must be 1..64, --seconds 1..3600 and --calm 0..3600")
    programs = [p.strip() for p in args.programs.split(",") if p.strip()]
    unknown = set(programs) - set(PROGRAMS)
    if unknown:
        parser.error(f"unknown program(s) {sorted(unknown)}; choose from {', '.join(PROGRAMS)}")
    if not args.start:
        text, ok = session(target_from_env(), args, programs)
        print(text)
        return 0 if ok else 1
    sys.path.insert(0, str(ROOT / "tests"))
    from harness import ARTIFACTS, Appliance, appliance_env

    ARTIFACTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        # Training would compete with the annotators for the CPU: the soak measures serving and recovery.
        app = Appliance(env=appliance_env(Path(tmp) / "data", APPLIANCE_TRAIN_MIN_NEW="100000",
                                          APPLIANCE_TRAIN_QUIET_SECONDS="604800"),
                        log_path=ARTIFACTS / "appliance-soak.log")
        app.log_path.write_text("")
        try:
            print(f"starting a throwaway appliance (log: {app.log_path}) ...", flush=True)
            print(f"ready in {app.start():.0f} s", flush=True)
            secrets = app.secrets()
            target = Target(app.url, app.token, app.data_dir, f"http://127.0.0.2:{app.env['APPLIANCE_SAM_PORT']}",
                            f"http://127.0.0.2:{app.env['APPLIANCE_PREDICT_PORT']}",
                            ("labelstudio", secrets["APPLIANCE_BACKEND_SECRET"]))
            deadline = time.time() + 180
            while not requests.get(f"{target.sam_url}/health", auth=target.backend_auth, timeout=5).json().get(
                    "ready") and time.time() < deadline:
                time.sleep(1)
            text, ok = session(target, args, programs)
            print(text)
            return 0 if ok else 1
        finally:
            if app.proc is not None and app.proc.poll() is None:
                app.stop()


if __name__ == "__main__":
    raise SystemExit(main())
