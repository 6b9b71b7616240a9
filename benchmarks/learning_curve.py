"""The learning curve on real data: annotate images 1..N, train, pre-annotate images 21..65, score.

On ../shared/data/nuclei (65 microscopy images, COCO RLE; see its README), for each architecture and each N:
train on images 1..N with the trainer's own training code (appliance.models.detection.train, the code the
training job runs), load the result as the prediction backend does (appliance.models.detection.model.Detector),
pre-annotate the evaluation images and report pycocotools segm/bbox AP50 and AP, the objects found (a predicted
mask at IoU >= 0.5 among the detections the backend would pre-annotate, score >= --score), training seconds and
seconds from the Nth annotation to the model serving (dataset + training + loading the model).

IN-PROCESS version: it does not go through the running appliance's HTTP API (no Label Studio, no journal watcher,
no debounce, no held-out gate); the figures are those of the training and inference code alone.

sam-det reads image embeddings from a store, as in the appliance: the annotated images' embeddings are computed
first ("the SAM backend computed them when the annotator clicked"; timed separately, not in training seconds); the
evaluation images are encoded on their first pre-annotation and reused for the next N (as in the appliance).

    OMP_WAIT_POLICY=PASSIVE .venv/app/bin/python benchmarks/learning_curve.py [--ns 5,10,20] \
        [--archs sam-det,rtmdet-ins-tiny] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "nuclei"


def load(data: Path, label: str | None) -> tuple[dict, list[dict], str]:
    """The set's photos holding ``label`` (default: its first category), in file order, with only that label's
    objects (crowd regions left out, as COCO scores them); and the label."""
    coco = json.loads((data / "annotations.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    label = label or coco["categories"][0]["name"]
    anns = [a for a in coco["annotations"] if names[a["category_id"]] == label and not a.get("iscrowd")]
    holding = {a["image_id"] for a in anns}
    images = sorted((i for i in coco["images"] if i["id"] in holding), key=lambda i: i["file_name"])
    return {**coco, "annotations": anns}, images, label


def subset(coco: dict, images: list[dict], out: Path, category: str) -> Path:
    """A COCO set of ``images`` (with each file's content key) in out/, images linked from the data folder."""
    from appliance.models.sam.cache import content_key

    (out / "images").mkdir(parents=True, exist_ok=True)
    ids = {i["id"] for i in images}
    entries = []
    for info in images:
        source = DATA / "images" / info["file_name"]
        target = out / "images" / info["file_name"]
        if not target.exists():
            target.symlink_to(source)
        entries.append({**info, "content_key": content_key(source.read_bytes())})
    anns = [dict(a, category_id=1) for a in coco["annotations"] if a["image_id"] in ids]
    (out / "annotations.json").write_text(json.dumps({
        "images": entries, "annotations": anns, "categories": [{"id": 1, "name": category}]}))
    return out / "annotations.json"


def fill_store(store_dir: Path, images: list[dict]) -> float:
    """Embeddings of the annotated images, as the SAM backend stores them for the annotator's clicks."""
    from appliance.models.detection.samdet.sam_parts import encode, load_sam
    from appliance.models.sam.cache import content_key
    from appliance.models.sam.store import EmbeddingStore

    store = EmbeddingStore(store_dir, 1 << 40)
    began = time.monotonic()
    for info in images:
        data = (DATA / "images" / info["file_name"]).read_bytes()
        key = content_key(data)
        if store.get(key) is None:
            store.put(key, encode(load_sam(), np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))))
    return time.monotonic() - began


def score(detector, ann_file: Path, image_dir: Path, threshold: float) -> dict:
    """pycocotools AP/AP50 (segm and bbox) and objects found at mask IoU >= 0.5 among detections >= threshold."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    from appliance.models.detection.evaluate import _map, _result

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
    results, found, began = [], 0, time.monotonic()
    for image_id in gt.getImgIds():
        info = gt.loadImgs(image_id)[0]
        pixels = np.asarray(Image.open(image_dir / info["file_name"]).convert("RGB"))
        detections = detector.predict(pixels, score_threshold=0.05, key=info.get("content_key"))
        results += [_result(image_id, 1, d) for d in detections]
        served = [d.mask for d in detections if d.score >= threshold and d.mask is not None]
        truth = [gt.annToMask(a).astype(bool) for a in gt.loadAnns(gt.getAnnIds(imgIds=image_id))]
        if served and truth:
            pred_rle = mask_utils.encode(np.asfortranarray(np.stack(served, -1).astype(np.uint8)))
            true_rle = mask_utils.encode(np.asfortranarray(np.stack(truth, -1).astype(np.uint8)))
            ious = mask_utils.iou(true_rle, pred_rle, [0] * len(served))
            found += int((np.asarray(ious).max(axis=1) >= 0.5).sum())
    segm = _map(gt, [r for r in results if "segmentation" in r], "segm")
    bbox = _map(gt, results, "bbox")
    return {"segm_AP50": segm[1], "segm_AP": segm[0], "bbox_AP50": bbox[1], "bbox_AP": bbox[0], "found": found,
            "objects": len(gt.getAnnIds()), "predict_s": round(time.monotonic() - began, 1)}


TUNE_PHOTOS = 10  # --cost: the first evaluation photos choose the thresholds, the others are costed


def cost_sets(work: Path, coco: dict, evaluated: list[dict], label: str):
    """(tune, costed) held-out sets (appliance.models.detection.holdout) with SAM's clicks for every object,
    computed once with the SAM backend's engine: the first TUNE_PHOTOS evaluation photos and the rest."""
    from appliance.models.detection import holdout
    from appliance.models.sam.engine import SamEngine
    from appliance.models.sam.store import EmbeddingStore

    engine = SamEngine(device="cpu")
    clicks = holdout.sam_clicks(engine, EmbeddingStore(work / "embeddings", 1 << 40))
    subset(coco, evaluated[:TUNE_PHOTOS], work / "tune", label)
    subset(coco, evaluated[TUNE_PHOTOS:], work / "costed", label)
    return holdout.load(work / "tune", clicks), holdout.load(work / "costed", clicks)


def annotator_cost(detector, sets) -> dict:
    """The annotator's actions on the costed photos (keep, delete, SAM clicks, submit; models/detection/cost.py)
    at the thresholds that cost least on the tuning photos, as the trainer chooses them on its held-out tasks."""
    from appliance.models.detection import holdout
    from appliance.models.detection.cost import NO_PREDICTIONS

    tune, costed = sets
    thresholds = holdout.score(detector, tune)["thresholds"]
    spent = holdout.score(detector, costed, thresholds=thresholds, default_threshold=NO_PREDICTIONS)["cost"]
    return {"thresholds": thresholds, **{f"cost_{k}": v for k, v in spent.items()}}


def run(arch: str, n: int, coco: dict, images: list[dict], work: Path, args, label: str, sets=None) -> dict:
    from appliance.models.detection.model import Detector
    from appliance.models.detection.train import train

    store = work / "embeddings" if arch.startswith("sam-") else None
    began = time.monotonic()
    train_dir = work / f"train-{n}"
    subset(coco, images[:n], train_dir, label)
    out = work / f"model-{arch}-{n}"
    shutil.rmtree(out, ignore_errors=True)
    epochs = args.sam_epochs if arch == "sam-det" else args.epochs
    trained_at = time.monotonic()
    train(train_dir, [label], out, arch=arch, epochs=epochs, batch_size=args.batch, threads=args.threads,
          img_size=args.img_size, device="cpu", embedding_store=store)
    train_s = time.monotonic() - trained_at
    detector = Detector(out, device="cpu", score_threshold=args.score, embedding_store=store)
    serve_s = time.monotonic() - began
    evaluation = score(detector, work / "eval" / "annotations.json", work / "eval" / "images", args.score)
    if sets is not None:
        evaluation.update(annotator_cost(detector, sets))
    return {"arch": arch, "n": n, "epochs": epochs, "train_s": round(train_s, 1), "serve_s": round(serve_s, 1),
            **evaluation}


def table(rows: list[dict]) -> str:
    head = ("arch", "N", "epochs", "segm AP50", "segm AP", "bbox AP50", "bbox AP", "found@0.5", "train s",
            "serve s", "predict s")
    costed = any("cost_actions" in r for r in rows)
    if costed:
        head += ("kept", "deleted", "actions", "SAM alone", "saved")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        line = (f"| {r['arch']} | {r['n']} | {r['epochs']} | {r['segm_AP50']:.3f} | {r['segm_AP']:.3f} | "
                f"{r['bbox_AP50']:.3f} | {r['bbox_AP']:.3f} | {r['found']}/{r['objects']} | {r['train_s']} | "
                f"{r['serve_s']} | {r['predict_s']} |")
        if costed:
            line += (f" {r['cost_kept']}/{r['cost_objects']} | {r['cost_deleted']} | {r['cost_actions']} | "
                     f"{r['cost_sam_only']} | {r['cost_saved']:.0%} |")
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    global DATA
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--ns", default="5,10,20")
    parser.add_argument("--archs", default="sam-det,rtmdet-ins-tiny")
    parser.add_argument("--label", help="the class of a one-class project (default: the set's first category); "
                                         "only the photos holding it are used")
    parser.add_argument("--eval", default="21-", help="1-based photo range to pre-annotate and score (21-: to the end)")
    parser.add_argument("--eval-step", type=int, default=1, help="score every k-th image of the range only")
    parser.add_argument("--epochs", type=int, default=30, help="RTMDet epochs (APPLIANCE_TRAIN_EPOCHS)")
    parser.add_argument("--sam-epochs", type=int, default=30, help="sam-det epochs")
    parser.add_argument("--img-size", type=int, default=320, help="RTMDet size (APPLIANCE_TRAIN_IMG_SIZE)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--score", type=float, default=0.3, help="APPLIANCE_SCORE_THRESHOLD")
    parser.add_argument("--work", type=Path, help="keep models and embeddings here (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--cost", action="store_true",
                        help=f"also the annotator's actions on the evaluation photos after the first {TUNE_PHOTOS} "
                             "(which choose the thresholds), against SAM clicks alone")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    DATA = args.data.resolve()
    coco, images, label = load(DATA, args.label)
    first, last = (int(v) if v else len(images) for v in args.eval.split("-"))
    work = args.work or Path(tempfile.mkdtemp(prefix="learning-curve-"))
    evaluated = images[first - 1:last:args.eval_step]
    subset(coco, evaluated, work / "eval", label)
    ns = [int(n) for n in args.ns.split(",")]
    sets = cost_sets(work, coco, evaluated, label) if args.cost else None
    rows = []
    for arch in args.archs.split(","):
        if arch.startswith("sam-"):
            encode_s = fill_store(work / "embeddings", images[:max(ns)])
            print(f"{arch}: embeddings of images 1-{max(ns)} (the SAM backend's clicks): {encode_s:.0f} s",
                  flush=True)
        for n in ns:
            rows.append(run(arch, n, coco, images, work, args, label, sets))
            print(json.dumps(rows[-1]), flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))
    step = f" (every {args.eval_step}th: {len(evaluated)} images)" if args.eval_step > 1 else ""
    print(f"\nTrained on {DATA.name} '{label}' photos 1-N, pre-annotated photos {first}-{last}{step} "
          f"({args.threads} CPU threads, in-process):\n")
    print(table(rows))


if __name__ == "__main__":
    main()
