"""`appliance export` on a whole real project: every photo of a set uploaded and annotated through Label Studio's
API (its masks as brush regions), then each format exported by the real command, timed, and read back.

Prints per format: images, objects, seconds, and what came back: COCO masks pixels differing from the submitted
ones (pycocotools), YOLO-seg polygons redrawn with the even-odd rule (mean / min IoU per object), mask PNG pixels
differing from the submitted masks painted in order.

    OMP_WAIT_POLICY=PASSIVE .venv/app/bin/python benchmarks/export_roundtrip.py --data nuclei [--photos 0 (all)]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from harness import Appliance, appliance_env  # noqa: E402

from appliance.export.polygons import rasterise  # noqa: E402
from appliance.models.sam.masks import mask_to_brush_rle  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def photos(data: str, limit: int) -> list[tuple[Path, list[np.ndarray]]]:
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(SHARED / data / "annotations.json"))
    out = []
    for info in sorted(coco.imgs.values(), key=lambda i: i["file_name"])[:limit or None]:
        masks = [coco.annToMask(a).astype(bool) for a in coco.loadAnns(coco.getAnnIds(imgIds=info["id"]))
                 if not a.get("iscrowd")]
        out.append((SHARED / data / "images" / info["file_name"], [m for m in masks if m.any()]))
    return out


def annotate(app: Appliance, chosen) -> dict[int, list[np.ndarray]]:
    project = app.state()["project_id"]
    config = app.api("GET", f"/api/projects/{project}").json()["label_config"]
    label = config.split('<BrushLabels', 1)[1].split('value="', 1)[1].split('"', 1)[0]
    tasks = {}
    for path, masks in chosen:
        with path.open("rb") as handle:
            app.api("POST", f"/api/projects/{project}/import", files={path.name: handle}).raise_for_status()
        listed = app.api("GET", f"/api/projects/{project}/export",
                         params={"exportType": "JSON", "download_all_tasks": "true"}).json()
        task_id = max(t["id"] for t in listed if str(t["data"].get("image", "")).endswith(f"-{path.name}"))
        result = [{"from_name": "mask", "to_name": "image", "type": "brushlabels", "original_width": m.shape[1],
                   "original_height": m.shape[0], "value": {"format": "rle", "rle": mask_to_brush_rle(m),
                                                            "brushlabels": [label]}} for m in masks]
        app.api("POST", f"/api/tasks/{task_id}/annotations", json={"result": result}).raise_for_status()
        tasks[task_id] = masks
    return tasks


def export(app: Appliance, fmt: str, out: Path) -> float:
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "appliance", "export", "--format", fmt, "--output", str(out)],
                          env=app.env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(done.stderr)
    return time.perf_counter() - began


def check_coco(out: Path, tasks) -> str:
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(out / "annotations.json"))
    differing = 0
    for task_id, masks in tasks.items():
        exported = [coco.annToMask(a).astype(bool) for a in coco.loadAnns(coco.getAnnIds(imgIds=task_id))]
        differing += sum(int((a != b).sum()) for a, b in zip(masks, exported)) + abs(len(masks) - len(exported))
    return f"{differing} pixels differ"


def check_yolo(out: Path, tasks) -> str:
    ious = []
    for task_id, masks in tasks.items():
        lines = (out / "labels" / f"{task_id}.txt").read_text().splitlines()
        if not masks:  # a photo without objects: an empty label file
            continue
        height, width = masks[0].shape
        for line, mask in zip(lines, masks):
            points = np.array(line.split()[1:], dtype=float).reshape(-1, 2) * [width, height]
            drawn = rasterise(points, width, height)
            ious.append((drawn & mask).sum() / (drawn | mask).sum())
    return f"IoU mean {np.mean(ious):.4f}, min {min(ious):.3f}"


def check_masks(out: Path, tasks) -> str:
    differing = 0
    for task_id, masks in tasks.items():
        instances = np.array(Image.open(out / "instances" / f"{task_id}.png"))
        if not masks:
            differing += int((instances != 0).sum())
            continue
        expected = np.zeros(masks[0].shape, dtype=np.uint16)
        for index, mask in enumerate(masks, start=1):
            expected[mask] = index
        differing += int((instances != expected).sum())
    return f"{differing} pixels differ"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="nuclei", choices=["nuclei", "coco-ccby"])
    parser.add_argument("--photos", type=int, default=0, help="only the first N photos (0: all)")
    args = parser.parse_args()
    chosen = photos(args.data, args.photos)
    with tempfile.TemporaryDirectory() as tmp:
        env = appliance_env(Path(tmp) / "data", APPLIANCE_SAMPLE_IMAGES="false",
                            APPLIANCE_TRAIN_QUIET_SECONDS="86400", APPLIANCE_TRAIN_MIN_NEW="100000")
        app = Appliance(env=env, log_path=Path(tmp) / "appliance.log")
        app.start()
        try:
            tasks = annotate(app, chosen)
            objects = sum(len(m) for m in tasks.values())
            print(f"\n{args.data}: {len(tasks)} images, {objects} objects\n")
            print("| format | images | objects | export s | read back |\n|---|---|---|---|---|")
            checks = {"coco": check_coco, "yolo-seg": check_yolo, "masks": check_masks, "label-studio": None}
            for fmt, check in checks.items():
                out = Path(tmp) / fmt
                seconds = export(app, fmt, out)
                shown = check(out, tasks) if check else "tasks.json"
                print(f"| {fmt} | {len(tasks)} | {objects} | {seconds:.1f} | {shown} |")
        finally:
            app.stop()


if __name__ == "__main__":
    main()
