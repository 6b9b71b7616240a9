"""Memory of the whole appliance, idle on its defaults: RSS and PSS per supervised program.

Starts `appliance up` (tests/harness.py) on a fresh temporary volume with the sample photos, waits until the
bootstrap finished, the SAM backend loaded its model and its encoder, and the machine settled (prefetch done),
then reads /proc for every process under supervisord and prints one row per program. PSS shares the pages that
forked workers have in common among them, so the PSS total is what the machine really holds.

    .venv/app/bin/python benchmarks/idle_memory.py [--settle 20] [--encoder auto|torch]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from harness import Appliance, appliance_env  # noqa: E402


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo += children(current)
    return out


def memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in kB."""
    values = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            parts = line.split()
            if parts and parts[0] in ("Rss:", "Pss:"):
                values[parts[0]] = int(parts[1])
    except OSError:
        return 0, 0
    return values.get("Rss:", 0), values.get("Pss:", 0)


def program_of(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [a.decode(errors="replace") for a in argv if a]
    if "run" in words and words.index("run") + 1 < len(words):
        return words[words.index("run") + 1]
    if any("supervisord" in w for w in words):
        return "supervisord"
    return Path(words[0]).name if words else "?"


def measure(root_pid: int) -> dict[str, list[int]]:
    """Program name -> [processes, RSS kB, PSS kB]: each program's process with all its children."""
    rows: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    supervisor = [p for p in tree(root_pid) if program_of(p) == "supervisord"]
    top = supervisor[0] if supervisor else root_pid
    for name, pids in [("up + supervisord", [root_pid] + ([top] if top != root_pid else []))] + [
            (program_of(child), tree(child)) for child in children(top)]:
        for pid in pids:
            rss, pss = memory_kb(pid)
            row = rows[name]
            row[0], row[1], row[2] = row[0] + 1, row[1] + rss, row[2] + pss
    return rows


def wait_sam(app: Appliance, encoder: str, timeout: float = 300) -> dict:
    url = f"http://{app.env.get('APPLIANCE_BACKEND_HOST', '127.0.0.2')}:{app.env['APPLIANCE_SAM_PORT']}/health"
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            auth = ("labelstudio", app.secrets()["APPLIANCE_BACKEND_SECRET"])
            health = requests.get(url, auth=auth, timeout=5).json()
            if health.get("ready") and (encoder == "torch" or health.get("encoder") in ("openvino", "onnxruntime")
                                        or health.get("encoder_error")):
                return health
        except (requests.RequestException, KeyError):
            pass
        time.sleep(1)
    raise TimeoutError("the SAM backend did not get ready")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settle", type=float, default=20, help="seconds to wait once ready (prefetch, GC)")
    parser.add_argument("--encoder", choices=("auto", "openvino", "onnxruntime", "torch"), default="auto",
                        help="APPLIANCE_SAM_ENCODER")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="idle-memory-"))
    app = Appliance(env=appliance_env(tmp / "data", APPLIANCE_SAM_ENCODER=args.encoder),
                    log_path=tmp / "appliance.log")
    try:
        boot = app.start()
        health = wait_sam(app, args.encoder)
        time.sleep(args.settle)
        rows = measure(app.proc.pid)
    finally:
        if app.proc is not None:
            app.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"Idle appliance on its defaults (fresh volume, bootstrap {boot:.0f} s, SAM encoder "
          f"{health.get('encoder')}), {args.settle:.0f} s after ready:\n")
    print("| program | processes | RSS MB | PSS MB |\n|---|---|---|---|")
    for name, (count, rss, pss) in sorted(rows.items(), key=lambda kv: -kv[1][2]):
        print(f"| {name} | {count} | {rss / 1024:.0f} | {pss / 1024:.0f} |")
    total = [sum(r[i] for r in rows.values()) for i in range(3)]
    print(f"| **total** | {total[0]} | {total[1] / 1024:.0f} | **{total[2] / 1024:.0f}** |")


if __name__ == "__main__":
    main()
