"""A model scored on the held-out tasks: COCO AP, and what its pre-annotations cost the annotator (cost.py).

SAM's clicks for each held-out object are computed once per run with the SAM engine the SAM backend uses (on the
embedding it stored for the image, when there is one) and shared by every model scored on the same tasks; the
clicks of an object refined from the prediction under its first click, per model.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from appliance.models.detection import cost
from appliance.models.detection.evaluate import LabelOf, evaluate_detections
from appliance.models.detection.model import Detection, Detector
from appliance.models.sam.annotator import interior

EVAL_THRESHOLD = 0.1  # the lowest score considered: AP is measured on these, thresholds are chosen above it

Clicker = Callable[..., int]  # (object's mask, seed=None) -> SAM's clicks for it, refining the seed mask


@dataclass
class HeldOut:
    gt: object  # pycocotools COCO of the held-out set
    ids: list[int]  # its image ids, in order
    images: list[np.ndarray]
    keys: list[str | None]
    truths: list[list[cost.Truth]]
    clickers: list[Clicker]


def has_photos(holdout: Path) -> bool:
    annotations = holdout / "annotations.json"
    return annotations.exists() and bool(json.loads(annotations.read_text()).get("images"))


def load(holdout: Path, clicks_for: Callable[[np.ndarray, str | None], Clicker] | None) -> HeldOut | None:
    """The held-out set of a run, with SAM's clicks for every object (``clicks_for(image, key)`` -> the clicker
    of that image); None when the set is empty."""
    from pycocotools.coco import COCO

    if not has_photos(holdout):
        return None
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(holdout / "annotations.json"))
    if not gt.getImgIds():
        return None
    names = {c["id"]: c["name"] for c in gt.loadCats(gt.getCatIds())}
    ids, images, keys, truths, clickers = [], [], [], [], []
    for image_id in gt.getImgIds():
        info = gt.loadImgs(image_id)[0]
        image = np.asarray(Image.open(holdout / "images" / info["file_name"]).convert("RGB"))
        key = info.get("content_key")
        clicks = clicks_for(image, key) if clicks_for else (lambda mask, seed=None: 1)
        objects = [(names[a["category_id"]], gt.annToMask(a).astype(bool))
                   for a in gt.loadAnns(gt.getAnnIds(imgIds=image_id)) if not a.get("iscrowd")]
        ids.append(image_id)
        images.append(image)
        keys.append(key)
        clickers.append(clicks)
        truths.append([cost.Truth(label, mask, clicks(mask)) for label, mask in objects if mask.any()])
    return HeldOut(gt, ids, images, keys, truths, clickers)


def score(detector: Detector, held: HeldOut, label_of: LabelOf | None = None,
          thresholds: dict[str, float] | None = None, default_threshold: float | None = None) -> dict:
    """COCO AP of ``detector`` on the held-out set, and its annotator cost: at ``thresholds`` (per model class,
    ``default_threshold`` for the others) when given (the serving model, as it serves), else at the thresholds
    that cost least (a candidate: they are stored with it and served)."""
    found = predictions(detector, held)
    metrics = evaluate_detections(held.gt, dict(zip(held.ids, found)), label_of)
    if thresholds is not None or default_threshold is not None:
        found = [[d for d in dets if d.score >= (thresholds or {}).get(d.label, default_threshold or 0.0)]
                 for dets in found]
        return {**metrics, "thresholds": thresholds, "cost": cost.total(costed(held, found, label_of)).as_dict()}
    photos = costed(held, found, label_of)
    thresholds = cost.choose_thresholds(photos, floor=EVAL_THRESHOLD)
    return {**metrics, "thresholds": thresholds, "cost": cost.total(photos, thresholds).as_dict(),
            "unseen": cost.unseen(photos, floor=EVAL_THRESHOLD)}


def predictions(detector: Detector, held: HeldOut) -> list[list[Detection]]:
    """The detector's predictions on every held-out photo, down to EVAL_THRESHOLD."""
    return [detector.predict(image, score_threshold=EVAL_THRESHOLD, key=key)
            for image, key in zip(held.images, held.keys)]


def costed(held: HeldOut, found: list[list[Detection]], label_of: LabelOf | None = None) -> list[cost.Photo]:
    """The held-out photos as cost.Photo: their objects with SAM's clicks, the predictions ``found`` on each, and
    the clicks of the objects refined from the prediction under their first click."""
    photos = []
    for truths, dets, clicker in zip(held.truths, found, held.clickers):
        predicted = _predicted(dets, label_of)
        photos.append(cost.Photo(truths, predicted, seeds=_seeds(truths, predicted, clicker)))
    return photos


def _predicted(detections: list[Detection], label_of: LabelOf | None) -> list[cost.Predicted]:
    out = []
    for det in detections:
        label = label_of(det.label) if label_of else det.label
        if label is not None and det.mask is not None:
            out.append(cost.Predicted(label, det.score, det.mask))
    return out


def _seeds(truths: list[cost.Truth], predicted: list[cost.Predicted], clicker: Clicker
           ) -> dict[int, tuple[int, int]]:
    """cost.Photo.seeds: for each object whose first click lands on a prediction of its label, the best-scored one
    there and SAM's clicks refining it, as the SAM backend does (models/sam/seeds.py)."""
    seeds = {}
    for j, truth in enumerate(truths):
        (x, y), _ = interior(truth.mask)
        under = [i for i, p in enumerate(predicted) if p.label == truth.label and p.mask[y, x]]
        if under:
            best = max(under, key=lambda i: predicted[i].score)
            seeds[j] = (best, clicker(truth.mask, seed=predicted[best].mask))
    return seeds


def sam_clicks(engine, store=None) -> Callable[[np.ndarray, str | None], Clicker]:
    """clicks_for(image, key) with SAM ``engine``: the image's embedding from ``store`` (an EmbeddingStore) by its
    content key, else encoded (and stored)."""
    from appliance.models.sam.annotator import EngineClicks

    def clicks_for(image: np.ndarray, key: str | None):
        features = store.get(key) if (store is not None and key) else None
        if features is None:
            embedding = engine.embed(image)
            if store is not None and key:
                store.put(key, embedding.features[0].cpu().numpy())
        else:
            embedding = engine.from_features(features, image.shape[:2])
        return EngineClicks(engine, embedding).clicks

    return clicks_for
