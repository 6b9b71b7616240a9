"""What the annotator pays over a whole project: the running appliance on its defaults, photo by photo.

One appliance (`appliance up`, a fresh volume, the trainer on its own schedule) with the project's photos in its
images folder and a template with the project's labels (brush + smart keypoints). For each photo, in file order:

1. the pre-annotation: the one Label Studio holds for the task when it is the serving version's (computed ahead by
   the trainer's re-prediction), else the prediction backend's /predict (as Label Studio asks when a task opens);
   the seconds until it is there are recorded;
2. the cost model of appliance.models.detection.cost: a predicted mask matching an object of its label at
   IoU >= 0.85 is kept (0 actions), every other prediction deleted (1), every object not kept costs its SAM clicks
   through Label Studio's interactive endpoint (the simulated annotator of appliance.models.sam.annotator, at most
   20; an object whose first click lands on a prediction is refined from it, as Label Studio sends the task's
   predictions along), the submit 1. SAM clicks alone: every object's clicks + the submit, in the same run, from
   the SAM backend asked with the task without its predictions;
3. the true masks are submitted as the task's annotation (brush RLE), which the trainer picks up when it will.

Prints per block of 10 photos and in total: objects, kept, deleted, clicks, actions per object with the loop and
with SAM clicks alone, the model versions the photos saw, and the time until a pre-annotation was there.

    OMP_WAIT_POLICY=PASSIVE .venv/app/bin/python benchmarks/project_sim.py --data coco-ccby --label person
        [--data nuclei] [--label all] [--photos 0 (all)] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import requests  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from harness import Appliance, appliance_env  # noqa: E402

from appliance.models.detection.cost import Cost, Photo, Predicted, Truth, photo_cost  # noqa: E402
from appliance.models.sam.annotator import MAX_CLICKS, clicks_to_reach, interior  # noqa: E402
from appliance.models.sam.masks import mask_to_brush_rle  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
BLOCK = 10


# --- the project ----------------------------------------------------------------------------------
def project(data: str, label: str, limit: int) -> tuple[list[dict], dict[str, list[tuple[str, np.ndarray]]]]:
    """The photos (COCO image infos, file order) and each one's objects as (label, mask); crowd regions left out.
    ``label``: one class (only the photos holding it, only its objects) or "all"."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(SHARED / data / "annotations.json"))
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    photos, objects = [], {}
    for info in sorted(coco.imgs.values(), key=lambda i: i["file_name"]):
        found = [(names[a["category_id"]], coco.annToMask(a).astype(bool))
                 for a in coco.loadAnns(coco.getAnnIds(imgIds=info["id"])) if not a.get("iscrowd")]
        found = [(n, m) for n, m in found if (label == "all" or n == label) and m.any()]
        if found:
            photos.append(info)
            objects[info["file_name"]] = found
    photos = photos[:limit] if limit else photos
    return photos, objects


def template(labels: list[str]) -> str:
    options = "".join(f'<Label value="{name}"/>' for name in labels)
    smart = "".join(f'<Label value="{name}" smart="true"/>' for name in labels)
    return ('<View><Image name="image" value="$image" zoom="true"/>'
            f'<BrushLabels name="mask" toName="image">{options}</BrushLabels>'
            f'<KeyPointLabels name="point" toName="image" smart="true">{smart}</KeyPointLabels></View>')


# --- the appliance, as the editor uses it ----------------------------------------------------------
class Session:
    def __init__(self, app: Appliance) -> None:
        self.app = app
        state = app.state()
        self.sam, self.predict_id = state["ml_backends"]["sam"], state["ml_backends"]["predict"]
        self.backend = f"http://127.0.0.2:{app.env['APPLIANCE_PREDICT_PORT']}"
        self.sam_backend = f"http://127.0.0.2:{app.env['APPLIANCE_SAM_PORT']}"
        self.auth = ("labelstudio", app.secrets()["APPLIANCE_BACKEND_SECRET"])
        self.config = app.api("GET", f"/api/projects/{state['project_id']}").json()["label_config"]

    def serving(self) -> str | None:
        try:
            return requests.get(f"{self.backend}/health", auth=self.auth, timeout=5).json().get("model_version")
        except requests.RequestException:
            return None

    def pre_annotation(self, task: dict) -> tuple[dict | None, float, bool]:
        """(prediction, seconds until it was there, whether it was computed ahead)."""
        began = time.perf_counter()
        version = self.serving()
        if version in (None, "no-model"):
            return None, time.perf_counter() - began, False
        stored = self.app.api("GET", f"/api/tasks/{task['id']}").json().get("predictions") or []
        ahead = [p for p in stored if p.get("model_version") == version]
        if ahead:
            return ahead[-1], time.perf_counter() - began, True
        response = requests.post(f"{self.backend}/predict", auth=self.auth, timeout=300,
                                 json={"tasks": [task], "label_config": self.config})
        result = response.json()["results"][0]
        if "result" not in result:
            return None, time.perf_counter() - began, False
        # Label Studio keeps what it fetched when the task opened: the task's prediction, as the editor shows it.
        self.app.api("POST", "/api/predictions", json={"task": task["id"], "result": result["result"],
                                                        "score": result.get("score"),
                                                        "model_version": result.get("model_version")})
        return result, time.perf_counter() - began, False

    def segment(self, task: dict, label: str, size: tuple[int, int], clicks, alone: bool = False) -> np.ndarray:
        """The mask of one object's clicks through Label Studio's interactive endpoint (a click on a prediction
        refines it); ``alone``: the SAM backend asked directly with the task without its predictions."""
        from label_studio_sdk.converter.brush import decode_rle

        height, width = size
        regions = [{"type": "keypointlabels", "from_name": "point", "to_name": "image", "image_rotation": 0,
                    "original_width": width, "original_height": height, "is_positive": positive,
                    "value": {"x": x * 100 / width, "y": y * 100 / height, "width": 0.5, "keypointlabels": [label]}}
                   for (x, y), positive in clicks]
        for _ in range(60):  # the SAM backend may still be loading on the first photo
            if alone:
                response = requests.post(f"{self.sam_backend}/predict", auth=self.auth, timeout=300, json={
                    "tasks": [{"id": task["id"], "data": task["data"]}], "label_config": self.config,
                    "params": {"context": {"result": regions}}})
                data = (response.json().get("results") or [{}])[0] if response.ok else {}
            else:
                response = self.app.api("POST", f"/api/ml/{self.sam}/interactive-annotating",
                                        json={"task": task["id"], "context": {"result": regions}})
                data = response.json().get("data") or {}
            masks = [r for r in data.get("result", []) if r["type"] == "brushlabels"]
            if response.ok and masks:
                return decode_rle(masks[0]["value"]["rle"]).reshape(height, width, 4)[:, :, 3] >= 128
            time.sleep(2)
        raise RuntimeError(f"no mask from the SAM backend: {response.status_code} {response.text[:300]}")

    def submit(self, task: dict, objects: list[tuple[str, np.ndarray]]) -> None:
        result = [{"from_name": "mask", "to_name": "image", "type": "brushlabels", "original_width": m.shape[1],
                   "original_height": m.shape[0], "image_rotation": 0,
                   "value": {"format": "rle", "rle": mask_to_brush_rle(m), "brushlabels": [name]}}
                  for name, m in objects]
        self.app.api("POST", f"/api/tasks/{task['id']}/annotations",
                     json={"result": result, "was_cancelled": False}).raise_for_status()


def predicted_masks(prediction: dict | None, size: tuple[int, int]) -> list[Predicted]:
    from label_studio_sdk.converter.brush import decode_rle

    height, width = size
    out = []
    for region in (prediction or {}).get("result", []):
        if region.get("type") == "brushlabels":
            mask = decode_rle(region["value"]["rle"]).reshape(height, width, 4)[:, :, 3] >= 128
            out.append(Predicted(region["value"]["brushlabels"][0], float(region.get("score", 1.0)), mask))
    return out


def tasks_by_file(app: Appliance, names: list[str], timeout: float = 300) -> dict[str, dict]:
    pid = app.state()["project_id"]
    deadline = time.time() + timeout
    while True:
        tasks = app.api("GET", f"/api/projects/{pid}/export",
                        params={"exportType": "JSON", "download_all_tasks": "true"}).json()
        found = {t["data"]["image"].rsplit("/", 1)[-1]: t for t in tasks}
        if all(n in found for n in names) or time.time() > deadline:
            return {n: {"id": found[n]["id"], "data": found[n]["data"]} for n in names}
        time.sleep(2)


# --- the run --------------------------------------------------------------------------------------
def run(args) -> dict:
    photos, objects = project(args.data, args.label, args.photos)
    labels = sorted({name for found in objects.values() for name, _ in found})
    workdir = Path(tempfile.mkdtemp(prefix="project-sim-"))
    env = appliance_env(workdir / "data", APPLIANCE_LABEL_CONFIG=template(labels), APPLIANCE_SAMPLE_IMAGES="false")
    folder = workdir / "data" / "images" / args.data
    folder.mkdir(parents=True)
    for info in photos:
        shutil.copy(SHARED / args.data / "images" / info["file_name"], folder / info["file_name"])
    app = Appliance(env=env, log_path=workdir / "appliance.log")
    app.start()
    rows = []
    try:
        app.api("POST", f"/api/storages/localfiles/{app.state()['local_storage_id']}/sync").raise_for_status()
        tasks = tasks_by_file(app, [i["file_name"] for i in photos])
        session = Session(app)
        for number, info in enumerate(photos, 1):
            rows.append(one_photo(session, number, tasks[info["file_name"]], objects[info["file_name"]]))
            print(json.dumps({k: v for k, v in rows[-1].items()}), flush=True)
        trainer = json.loads((app.data_dir / "trainer" / "status.json").read_text())
    finally:
        app.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return {"data": args.data, "label": args.label, "labels": labels, "rows": rows,
            "last_run": (trainer.get("last") or {}).get("result")}


def one_photo(session: Session, number: int, task: dict, objects: list[tuple[str, np.ndarray]]) -> dict:
    size = objects[0][1].shape
    prediction, waited, ahead = session.pre_annotation(task)
    truths, seeds = [], {}
    predicted = predicted_masks(prediction, size)
    for j, (name, mask) in enumerate(objects):
        clicks = clicks_to_reach(lambda c, name=name: session.segment(task, name, size, c, alone=True), mask,
                                 max_clicks=MAX_CLICKS)
        truths.append(Truth(name, mask, clicks))
        (x, y), _ = interior(mask)
        under = [i for i, p in enumerate(predicted) if p.label == name and p.mask[y, x]]
        if under:  # the first click lands on a prediction: through Label Studio, which sends it to SAM
            seeds[j] = (max(under, key=lambda i: predicted[i].score),
                        clicks_to_reach(lambda c, name=name: session.segment(task, name, size, c), mask,
                                        max_clicks=MAX_CLICKS))
    cost = photo_cost(Photo(truths, predicted, seeds=seeds))
    session.submit(task, objects)
    return {"photo": number, "version": (prediction or {}).get("model_version") or "none", "wait_s": round(waited, 3),
            "ahead": ahead, **{k: v for k, v in cost.as_dict().items() if k != "saved"}}


# --- the tables -----------------------------------------------------------------------------------
def _sum(rows: list[dict]) -> Cost:
    cost = Cost()
    for row in rows:
        cost.add(Cost(row["photos"], row["objects"], row["kept"], row["deleted"], row["clicks"], row["sam_only"],
                      row["predictions"]))
    return cost


def _line(name: str, rows: list[dict]) -> str:
    cost = _sum(rows)
    versions = sorted({r["version"] for r in rows})
    waits = [r["wait_s"] for r in rows if r["version"] != "none"]
    wait = f"{np.percentile(waits, 50):.2f} / {max(waits):.2f}" if waits else "-"
    ahead = sum(r["ahead"] for r in rows)
    return (f"| {name} | {cost.objects} | {cost.predictions} | {cost.kept} | {cost.deleted} | {cost.clicks} | "
            f"{cost.actions} | {cost.sam_only} | {cost.actions / max(1, cost.objects):.2f} | "
            f"{cost.sam_only / max(1, cost.objects):.2f} | {cost.actions / max(1, cost.sam_only):.2f} | "
            f"{', '.join(versions)} | {wait} | {ahead} |")


def table(result: dict) -> str:
    rows = result["rows"]
    lines = [f"{result['data']} / {result['label']}: {len(rows)} photos, {sum(r['objects'] for r in rows)} objects, "
             f"labels {', '.join(result['labels'][:8])}{' …' if len(result['labels']) > 8 else ''}", "",
             "| photos | objects | predicted | kept | deleted | clicks | actions | SAM only | actions/object | "
             "SAM only/object | loop / SAM only | versions seen | pre-annotation wait p50 / max s | ahead |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for start in range(0, len(rows), BLOCK):
        block = rows[start:start + BLOCK]
        lines.append(_line(f"{block[0]['photo']}–{block[-1]['photo']}", block))
    lines.append(_line("**all**", rows))
    if len(rows) > 20:
        lines.append(_line("**21 onwards**", rows[20:]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="coco-ccby", choices=["coco-ccby", "nuclei"])
    parser.add_argument("--label", default="person", help='one class, or "all"')
    parser.add_argument("--photos", type=int, default=0, help="only the first N photos (0: all)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = run(args)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
