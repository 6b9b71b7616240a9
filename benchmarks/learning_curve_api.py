"""The learning curve through the running appliance: annotate nuclei 1..N in Label Studio, the trainer publishes,
the prediction backend pre-annotates nuclei 21..65, and the pre-annotations are scored.

For each architecture, one appliance (`appliance up`, a fresh volume) with the 65 images of ../shared/data/nuclei in
its images folder and a template with one brush label, "Nucleus". For N = 5, 10, 20: the true masks of images 1..N
are submitted as annotations through Label Studio's API (brush RLE), then Label Studio's "Start training" (POST
/api/ml/{id}/train) asks for a run (the trainer would start by itself after APPLIANCE_TRAIN_MIN_NEW annotations or
APPLIANCE_TRAIN_QUIET_SECONDS of quiet; asking removes that wait from the figures). The trainer splits the
annotated tasks (at least 3 held out), trains, evaluates, publishes only if better, and re-predicts the unlabeled
tasks. The predictions Label Studio then holds for images 21..65 (model_version = the new version) are scored with
pycocotools: segm and bbox AP50 and AP, and the objects found (a served mask at IoU >= 0.5). Boxes are the masks'.

    OMP_WAIT_POLICY=PASSIVE .venv/app/bin/python benchmarks/learning_curve_api.py [--archs sam-det,rtmdet-ins-tiny]
        [--ns 5,10,20] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from harness import Appliance, appliance_env  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "nuclei"
EVAL_FROM = 21  # images 21..65 are pre-annotated and scored
TEMPLATE = ('<View><Image name="image" value="$image" zoom="true"/>'
            '<BrushLabels name="mask" toName="image"><Label value="Nucleus"/></BrushLabels></View>')


def truth(data: Path = DATA) -> tuple[list[dict], dict[str, list[np.ndarray]]]:
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(data / "annotations.json"))
    images = sorted(coco.imgs.values(), key=lambda i: i["file_name"])
    masks = {i["file_name"]: [coco.annToMask(a).astype(bool) for a in coco.loadAnns(coco.getAnnIds(imgIds=i["id"]))]
             for i in images}
    return images, masks


def brush(mask: np.ndarray) -> dict:
    from appliance.models.sam.masks import mask_to_brush_rle

    height, width = mask.shape
    return {"from_name": "mask", "to_name": "image", "type": "brushlabels", "original_width": width,
            "original_height": height, "image_rotation": 0,
            "value": {"format": "rle", "rle": mask_to_brush_rle(mask), "brushlabels": ["Nucleus"]}}


def tasks_by_file(app: Appliance, expected: int, timeout: float = 120, prefix: str = "nuclei_") -> dict[str, dict]:
    pid = app.state()["project_id"]
    deadline = time.time() + timeout
    while True:
        tasks = app.api("GET", f"/api/projects/{pid}/export",
                        params={"exportType": "JSON", "download_all_tasks": "true"}).json()
        found = {t["data"]["image"].rsplit("/", 1)[-1]: t for t in tasks if prefix in t["data"]["image"]}
        if len(found) >= expected or time.time() > deadline:
            return found
        time.sleep(2)


def trainer_status(app: Appliance) -> dict:
    path = app.data_dir / "trainer" / "status.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def serving_version(app: Appliance) -> str | None:
    url = f"http://127.0.0.2:{app.env['APPLIANCE_PREDICT_PORT']}/health"
    auth = ("labelstudio", app.secrets()["APPLIANCE_BACKEND_SECRET"])
    try:
        return requests.get(url, auth=auth, timeout=5).json().get("model_version")
    except requests.RequestException:
        return None


def train_round(app: Appliance, tasks: dict, masks: dict, files: list[str]) -> dict:
    """Submit the annotations of ``files``, press "Start training", wait for the run's outcome and the swap."""
    before = trainer_status(app).get("last", {}).get("run")
    for name in files:
        response = app.api("POST", f"/api/tasks/{tasks[name]['id']}/annotations",
                           json={"result": [brush(m) for m in masks[name]], "was_cancelled": False})
        response.raise_for_status()
    submitted = time.time()
    backend = app.state()["ml_backends"]["predict"]
    app.api("POST", f"/api/ml/{backend}/train", json={}).raise_for_status()
    while (last := trainer_status(app).get("last", {})).get("run") in (None, before):
        time.sleep(1)
    serving = None
    if last.get("result") == "published":
        while serving_version(app) != last["version"]:
            time.sleep(0.5)
        serving = time.time() - submitted
    return {"last": last, "to_serving_s": serving, "dataset": trainer_status(app).get("dataset", {})}


def served_predictions(app: Appliance, version: str, tasks: dict[str, dict], files: list[str],
                       timeout: float = 900) -> dict[str, dict]:
    """file name -> the prediction of ``version`` Label Studio holds for it (the trainer's re-prediction)."""
    names = {tasks[name]["id"]: name for name in files}
    deadline = time.time() + timeout
    while True:
        listed = app.api("GET", "/api/predictions/", params={"project": app.state()["project_id"]}).json()
        found = {names[p["task"]]: p for p in (listed if isinstance(listed, list) else listed.get("results", []))
                 if p.get("task") in names and p.get("model_version") == version}
        if len(found) == len(files) or time.time() > deadline:
            return found
        time.sleep(3)


def score(predictions: dict[str, dict], images: list[dict], masks: dict) -> dict:
    from label_studio_sdk.converter.brush import decode_rle
    from pycocotools import mask as mask_utils

    from appliance.models.detection.evaluate import _map  # noqa: PLC2701 - the trainer's own AP computation
    from pycocotools.coco import COCO

    gt = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "Nucleus"}]}
    results, found = [], 0
    for image_id, info in enumerate(images, 1):
        height, width = info["height"], info["width"]
        gt["images"].append({"id": image_id, "file_name": info["file_name"], "width": width, "height": height})
        truth_rles = []
        for m in masks[info["file_name"]]:
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            truth_rles.append(rle)
            x, y, w, h = mask_utils.toBbox(rle).tolist()
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": image_id, "category_id": 1,
                                      "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                                      "area": float(m.sum()), "bbox": [x, y, w, h], "iscrowd": 0})
        served = []
        for region in (predictions.get(info["file_name"]) or {}).get("result", []):
            if region.get("type") != "brushlabels":
                continue
            mask = decode_rle(region["value"]["rle"]).reshape(height, width, 4)[:, :, 3] >= 128
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            served.append(rle)
            results.append({"image_id": image_id, "category_id": 1, "score": float(region.get("score", 1.0)),
                            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                            "bbox": mask_utils.toBbox(rle).tolist()})
        if served and truth_rles:
            ious = mask_utils.iou(truth_rles, served, [0] * len(served))
            found += int((np.asarray(ious).max(axis=1) >= 0.5).sum())
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
    segm, bbox = _map(coco, results, "segm"), _map(coco, [{k: v for k, v in r.items() if k != "segmentation"}
                                                          for r in results], "bbox")
    return {"segm_AP50": segm[1], "segm_AP": segm[0], "bbox_AP50": bbox[1], "bbox_AP": bbox[0], "found": found,
            "objects": len(gt["annotations"]), "served_masks": len(results)}


def run_arch(arch: str, ns: list[int], threads: int, workdir: Path) -> list[dict]:
    images, masks = truth()
    names = [i["file_name"] for i in images]
    eval_images = images[EVAL_FROM - 1:]
    env = appliance_env(workdir / arch, APPLIANCE_TRAIN_ARCH=arch, APPLIANCE_LABEL_CONFIG=TEMPLATE,
                        APPLIANCE_SAMPLE_IMAGES="false", APPLIANCE_TRAIN_MIN_NEW="100000",
                        APPLIANCE_TRAIN_QUIET_SECONDS="604800", APPLIANCE_TRAIN_THREADS=str(threads),
                        APPLIANCE_SAM_PREFETCH="0")
    folder = workdir / arch / "images" / "nuclei"
    folder.mkdir(parents=True)
    for name in names:
        shutil.copy(DATA / "images" / name, folder / name)
    app = Appliance(env=env, log_path=workdir / f"{arch}.log")
    app.start()
    rows = []
    try:
        app.api("POST", f"/api/storages/localfiles/{app.state()['local_storage_id']}/sync").raise_for_status()
        tasks = tasks_by_file(app, len(names))
        done, serving = 0, None
        for n in ns:
            outcome = train_round(app, tasks, masks, names[done:n])
            done = n
            last = outcome["last"]
            row = {"arch": arch, "n": n, "result": last.get("result"), "version": last.get("version"),
                   "why": last.get("why"), "train_s": (last.get("timings") or {}).get("train"),
                   "timings": last.get("timings"), "to_serving_s": outcome["to_serving_s"],
                   "holdout_images": outcome["dataset"].get("holdout_images"),
                   "train_images": outcome["dataset"].get("train_images"),
                   "holdout_AP50": (last.get("candidate") or {}).get("segm_AP50")}
            serving = last.get("version") if last.get("result") == "published" else serving
            if serving:  # the version serving now (a rejected run leaves the previous one)
                predictions = served_predictions(app, serving, tasks, [i["file_name"] for i in eval_images])
                row.update(score(predictions, eval_images, masks), predicted_tasks=len(predictions),
                           scored_version=serving)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        app.stop()
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| arch | N | train/held-out | run | segm AP50 | segm AP | bbox AP50 | bbox AP | found (of objects) "
             "| training s | Nth annotation -> serving s |", "| --- " * 11 + "|"]
    for r in rows:
        def fmt(k: str, r: dict = r) -> str:
            return f"{r[k]:.3f}" if r.get(k) is not None else "-"

        run = r["result"] if r["result"] != "rejected" else f"rejected ({(r.get('why') or '')[:40]})"
        found = f"{r['found']} of {r['objects']}" if "found" in r else "-"
        lines.append(f"| {r['arch']} | {r['n']} | {r.get('train_images')}/{r.get('holdout_images')} | {run} "
                     f"| {fmt('segm_AP50')} | {fmt('segm_AP')} | {fmt('bbox_AP50')} | {fmt('bbox_AP')} | {found} "
                     f"| {r['train_s'] if r['train_s'] is None else round(r['train_s'])} "
                     f"| {'-' if r['to_serving_s'] is None else round(r['to_serving_s'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="sam-det,rtmdet-ins-tiny")
    parser.add_argument("--ns", default="5,10,20")
    parser.add_argument("--threads", type=int, default=2, help="APPLIANCE_TRAIN_THREADS")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the appliance (finally) when stopped
    ns = [int(n) for n in args.ns.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="curve-") as tmp:
        for arch in args.archs.split(","):
            rows += run_arch(arch, ns, args.threads, Path(tmp))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()
