"""The simulated annotator: the bare SamPredictor and the appliance (through Label Studio) on real images, one run.

The standard protocol of interactive segmentation benchmarks: the first click at the object's most interior point
(the maximum of the distance transform of its true mask), each next click at the most interior point of the largest
error region (positive when the model missed it, negative when the model added it), up to --max-clicks. With
--box the object starts from its tight box instead (as people and other multi-part objects are drawn: a smart box),
then the same clicks.

    bare       mobile_sam's SamPredictor in this process: the first click with multimask_output (best score kept),
               each next one with the previous low-resolution logits as mask_input (SAM's own protocol)
    previous   the appliance's decoder before it kept each object's mask: all clicks, no mask_input (in-process)
    rules      the SAM backend's click rules (appliance.models.sam.objects.ObjectSegmenter) in this process, with
               its CPU encoder: what the appliance answers, without HTTP (alone with --no-studio: a quick check)
    appliance  `appliance up` on a fresh volume with the images in its images folder; each click is POSTed to Label
               Studio's /api/ml/{id}/interactive-annotating with all the object's clicks so far, as the editor
               does; the object is the first mask returned (a second one means the backend split the object)

Prints mIoU after 1 click, NoC@85 and NoC@90 (clicks to reach the IoU, --max-clicks when never), the objects whose
IoU stays flat below 0.85 for 3 clicks in a row where the bare model's does not (stuck refinement), and click latency
p50/p95 (the appliance's through Label Studio, with the embedding cached: one unmeasured click per image first).

    OMP_WAIT_POLICY=PASSIVE .venv/app/bin/python benchmarks/sam_clicks.py [--data nuclei|coco-ccby] [--box]
        [--images 6] [--objects 12] [--max-clicks 10] [--threads 2] [--no-studio] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import cv2  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from harness import Appliance, appliance_env  # noqa: E402
from learning_curve_api import tasks_by_file, truth  # noqa: E402

from appliance.models.sam.annotator import interior, iou, next_click  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
TEMPLATE = ('<View><Image name="image" value="$image" zoom="true"/>'
            '<BrushLabels name="mask" toName="image"><Label value="Object"/></BrushLabels>'
            '<KeyPointLabels name="point" toName="image" smart="true"><Label value="Object" smart="true"/>'
            '</KeyPointLabels><RectangleLabels name="box" toName="image" smart="true">'
            '<Label value="Object" smart="true"/></RectangleLabels></View>')
MIN_AREA = {"nuclei": 20, "coco-ccby": 400}  # pixels: smaller objects are skipped


# --- the simulated annotator (appliance.models.sam.annotator) ------------------------------------
def annotate(segment, truth_mask: np.ndarray, max_clicks: int, box: bool = False) -> tuple[list[float], list[float]]:
    """IoU after each click and the seconds each click took; ``segment(clicks) -> mask``. With ``box`` the first
    prompt is the object's tight box ``((x0, y0, x1, y1), None)``."""
    clicks = [(tight_box(truth_mask), None) if box else (interior(truth_mask)[0], True)]
    ious, seconds = [], []
    while True:
        began = time.perf_counter()
        mask = segment(clicks)
        seconds.append(time.perf_counter() - began)
        ious.append(iou(mask, truth_mask))
        if len(clicks) == max_clicks or ious[-1] > 0.99:
            ious += [ious[-1]] * (max_clicks - len(ious))
            return ious, seconds
        clicks.append(next_click(truth_mask, mask))


def tight_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def split(clicks):
    """The points (with 0/1 labels) and the box of a click list."""
    points = [p for p, positive in clicks if positive is not None]
    labels = [int(positive) for _, positive in clicks if positive is not None]
    box = next((p for p, positive in clicks if positive is None), None)
    return points, labels, box


# --- the two systems ------------------------------------------------------------------------------
class Bare:
    def __init__(self) -> None:
        from mobile_sam import SamPredictor, sam_model_registry

        from appliance.models.sam.weights import mobile_sam_path

        self.predictor = SamPredictor(sam_model_registry["vit_t"](checkpoint=str(mobile_sam_path())).eval())

    def image(self, rgb: np.ndarray) -> None:
        self.predictor.set_image(rgb)
        self.logits = None

    def segment(self, clicks) -> np.ndarray:
        points, labels, box = split(clicks)
        first = len(clicks) == 1
        masks, scores, logits = self.predictor.predict(
            np.array(points, dtype=np.float32) if points else None, np.array(labels) if points else None,
            box=None if box is None else np.array(box), mask_input=None if first else self.logits,
            multimask_output=first and box is None)
        best = int(np.argmax(scores))
        self.logits = logits[best][None]
        return masks[best]


class Previous:
    """What the SAM backend did before: every request decoded all the object's clicks without its previous mask."""

    def __init__(self) -> None:
        from appliance.models.sam.engine import SamEngine

        self.engine = SamEngine(device="cpu")

    def image(self, rgb: np.ndarray) -> None:
        self.embedding = self.engine.embed(rgb)

    def segment(self, clicks) -> np.ndarray:
        points, labels, box = split(clicks)
        return self.engine.segment(self.embedding, points, labels, box)[0]


class Segmenter:
    """The SAM backend's click rules in this process (appliance.models.sam.objects, its CPU encoder): the first
    object's mask, as the editor shows it. The same answers as through Label Studio, minus HTTP."""

    def __init__(self, threads: int) -> None:
        from appliance.models.sam.cache import EmbeddingCache
        from appliance.models.sam.engine import SamEngine
        from appliance.models.sam.objects import ObjectSegmenter

        self.engine = SamEngine(device="cpu")
        with contextlib.suppress(Exception):  # as the backend: PyTorch stays where the export fails
            self.engine.use_onnx(None, threads=threads)
        self.segmenter = ObjectSegmenter(self.engine, EmbeddingCache(1 << 30))
        self.images = 0

    def image(self, rgb: np.ndarray) -> None:
        self.embedding, self.images = self.engine.embed(rgb), self.images + 1

    def segment(self, clicks) -> np.ndarray:
        from appliance.models.sam.objects import Click

        prompts = [Click(box=p) if positive is None else Click(point=p, positive=positive) for p, positive in clicks]
        return self.segmenter.segment(self.embedding, str(self.images), prompts)[0].mask


class ThroughStudio:
    def __init__(self, app: Appliance, task: dict, size: tuple[int, int]) -> None:
        self.app, self.task, (self.height, self.width) = app, task, size
        self.backend = app.state()["ml_backends"]["sam"]
        self.splits = 0

    def segment(self, clicks) -> np.ndarray:
        from label_studio_sdk.converter.brush import decode_rle

        regions = [self._region(prompt, positive) for prompt, positive in clicks]
        response = self.app.api("POST", f"/api/ml/{self.backend}/interactive-annotating",
                                json={"task": self.task["id"], "context": {"result": regions}})
        response.raise_for_status()
        data = response.json()["data"]
        masks = [r for r in data.get("result", []) if r["type"] == "brushlabels"]
        if not masks:
            raise RuntimeError(f"no mask: {data.get('error')}")
        self.splits += len(masks) > 1
        return decode_rle(masks[0]["value"]["rle"]).reshape(self.height, self.width, 4)[:, :, 3] >= 128

    def _region(self, prompt, positive) -> dict:
        common = {"to_name": "image", "image_rotation": 0, "original_width": self.width,
                  "original_height": self.height}
        if positive is None:  # a smart box, in percent as the editor sends it
            x0, y0, x1, y1 = prompt
            return {**common, "type": "rectanglelabels", "from_name": "box",
                    "value": {"x": x0 * 100 / self.width, "y": y0 * 100 / self.height,
                              "width": (x1 - x0) * 100 / self.width, "height": (y1 - y0) * 100 / self.height,
                              "rectanglelabels": ["Object"]}}
        (x, y) = prompt
        return {**common, "type": "keypointlabels", "from_name": "point", "is_positive": positive,
                "value": {"x": x * 100 / self.width, "y": y * 100 / self.height, "width": 0.5,
                          "keypointlabels": ["Object"]}}


# --- the run --------------------------------------------------------------------------------------
def pick(images, masks, n_images: int, n_objects: int, min_area: int = 20, seed: int = 0):
    rng = np.random.default_rng(seed)
    chosen = [images[i] for i in np.linspace(0, len(images) - 1, n_images).round().astype(int)]
    picked = {}
    for info in chosen:
        objects = [m for m in masks[info["file_name"]] if m.sum() >= min_area]
        order = rng.permutation(len(objects))[:n_objects]
        if len(order):
            picked[info["file_name"]] = [objects[i] for i in order]
    return picked


def stuck(ious: list[float]) -> bool:
    """IoU flat below 0.85 for 3 clicks in a row."""
    return any(ious[i] < 0.85 and abs(ious[i + 1] - ious[i]) < 1e-6 and abs(ious[i + 2] - ious[i]) < 1e-6
               for i in range(len(ious) - 2))


def summary(rows: list[tuple[list[float], list[float]]], max_clicks: int, bare=None) -> dict:
    def noc(ious, goal):
        return next((i + 1 for i, v in enumerate(ious) if v >= goal), max_clicks)

    latencies = np.array([s for _, seconds in rows for s in seconds]) * 1000
    return {"objects": len(rows), "mIoU@1": float(np.mean([ious[0] for ious, _ in rows])),
            "mIoU@3": float(np.mean([ious[2] for ious, _ in rows])),
            "NoC@85": float(np.mean([noc(ious, 0.85) for ious, _ in rows])),
            "NoC@90": float(np.mean([noc(ious, 0.90) for ious, _ in rows])),
            "p50_ms": float(np.percentile(latencies, 50)), "p95_ms": float(np.percentile(latencies, 95)),
            "clicks": int(latencies.size),
            "stuck": sum(stuck(ious) and not (bare and stuck(bare[i][0])) for i, (ious, _) in enumerate(rows))}


def run(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    data = SHARED / args.data
    images, masks = truth(data)
    picked = pick(images, masks, args.images, args.objects, MIN_AREA[args.data])
    bare, bare_rows, previous, previous_rows = Bare(), [], Previous(), []
    rules, rules_rows = Segmenter(args.threads), []
    for name, objects in picked.items():
        rgb = cv2.cvtColor(cv2.imread(str(data / "images" / name)), cv2.COLOR_BGR2RGB)
        for system, rows in ((bare, bare_rows), (previous, previous_rows), (rules, rules_rows)):
            system.image(rgb)
            rows += [annotate(system.segment, m, args.max_clicks, args.box) for m in objects]
    result = {"bare": summary(bare_rows, args.max_clicks),
              "previous": summary(previous_rows, args.max_clicks, bare_rows),
              "rules": summary(rules_rows, args.max_clicks, bare_rows), "data": args.data, "box": args.box,
              "splits": 0, "images": list(picked), "max_clicks": args.max_clicks}
    if args.no_studio:
        return result

    workdir = Path(tempfile.mkdtemp(prefix="sam-clicks-"))
    env = appliance_env(workdir, APPLIANCE_LABEL_CONFIG=TEMPLATE, APPLIANCE_SAMPLE_IMAGES="false",
                        APPLIANCE_TRAIN_MIN_NEW="100000", APPLIANCE_TRAIN_QUIET_SECONDS="604800",
                        APPLIANCE_TORCH_THREADS=str(args.threads))
    folder = workdir / "images" / args.data
    folder.mkdir(parents=True)
    for name in picked:
        shutil.copy(data / "images" / name, folder / name)
    app = Appliance(env=env, log_path=workdir / "appliance.log")
    app.start()
    studio_rows, splits = [], 0
    try:
        app.api("POST", f"/api/storages/localfiles/{app.state()['local_storage_id']}/sync").raise_for_status()
        tasks = tasks_by_file(app, len(picked), prefix="")  # sample images are off: every task is ours
        for name, objects in picked.items():
            size = objects[0].shape
            studio = ThroughStudio(app, tasks[name], size)
            _wait_ready(studio, objects[0])
            studio_rows += [annotate(studio.segment, m, args.max_clicks, args.box) for m in objects]
            splits += studio.splits
    finally:
        app.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return {**result, "appliance": summary(studio_rows, args.max_clicks, bare_rows), "splits": splits}


def _wait_ready(studio: ThroughStudio, mask: np.ndarray, timeout: float = 300) -> None:
    """One unmeasured click: waits for SAM to load and caches this image's embedding."""
    deadline = time.time() + timeout
    while True:
        try:
            studio.segment([(interior(mask)[0], True)])
            return
        except RuntimeError:
            if time.time() > deadline:
                raise
            time.sleep(2)


def table(result: dict) -> str:
    bare, ours = result["bare"], result.get("appliance", result["rules"])
    start = "a box, then clicks" if result["box"] else "clicks"
    lines = [f"{result['data']}: {bare['objects']} objects on {len(result['images'])} images, {start}, up to "
             f"{result['max_clicks']} clicks; clicks the appliance answered with more than one mask: "
             f"{result['splits']}", "",
             "| system | mIoU@1 | mIoU@3 | NoC@85 | NoC@90 | stuck | click p50 ms | click p95 ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    systems = [("bare SamPredictor", bare), ("previous appliance decoder (no mask_input, in-process)",
                                             result["previous"]),
               ("the appliance's click rules in-process (ObjectSegmenter)", result["rules"])]
    systems += [("appliance via Label Studio", result["appliance"])] if "appliance" in result else []
    for name, row in systems:
        lines.append(f"| {name} | {row['mIoU@1']:.3f} | {row['mIoU@3']:.3f} | {row['NoC@85']:.2f} | "
                     f"{row['NoC@90']:.2f} | {row['stuck']} | {row['p50_ms']:.0f} | {row['p95_ms']:.0f} |")
    lines.append("| appliance / bare | " + " | ".join(
        f"{ours[k] / bare[k]:.3f}" if bare[k] else "-" for k in ("mIoU@1", "mIoU@3", "NoC@85", "NoC@90")) + " | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=sorted(MIN_AREA), default="nuclei", help="a set in ../shared/data")
    parser.add_argument("--box", action="store_true", help="start each object from its tight box")
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--objects", type=int, default=12, help="objects per image (a seeded random sample)")
    parser.add_argument("--max-clicks", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-studio", action="store_true",
                        help="the click rules in-process only: no appliance, no Label Studio (a quick check)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = run(args)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
