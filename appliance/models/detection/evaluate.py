"""COCO mAP of a detector on a held-out COCO set (pycocotools COCOeval)."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Callable, Union

import numpy as np
from PIL import Image

from appliance.models.detection.model import Detection, Detector

PredictFn = Callable[[np.ndarray], list[Detection]]
MAX_DETECTIONS = 1000  # per image, in AP (COCO's default of 100 caps recall on dense images)
LabelOf = Callable[[str], "str | None"]
KeyedPredictFn = Callable[[np.ndarray, "str | None"], list[Detection]]


def evaluate(detector: Union[Detector, PredictFn], coco_json: Path, image_dir: Path,
             score_threshold: float = 0.05, label_of: LabelOf | None = None) -> dict[str, float]:
    """{"bbox_mAP", "segm_mAP"} (COCO AP@[.5:.95], 0 when nothing is detected), "bbox_AP50", "segm_AP50" (AP at
    IoU 0.5) and the number of held-out "images" and "objects" they were measured on.

    Detections are matched to categories by name, after ``label_of`` (model class -> label or None: the label map
    a pretrained model is served with; detections without a label are dropped). A Detector is run with
    score_threshold (low, as usual for mAP); a plain function is used as is.
    """
    gt = _load(coco_json)
    predict = _predict_fn(detector, score_threshold)
    found = {}
    for image_id in gt.getImgIds():
        info = gt.loadImgs(image_id)[0]
        image = np.asarray(Image.open(Path(image_dir) / info["file_name"]).convert("RGB"))
        found[image_id] = predict(image, info.get("content_key"))
    return evaluate_detections(gt, found, label_of)


def evaluate_detections(gt, found: dict[int, list[Detection]], label_of: LabelOf | None = None) -> dict[str, float]:
    """evaluate()'s figures for detections already made: {COCO image id: detections} on the COCO set ``gt``."""
    category_ids = {c["name"]: c["id"] for c in gt.loadCats(gt.getCatIds())}
    results = []
    for image_id, detections in found.items():
        for det in detections:
            label = label_of(det.label) if label_of else det.label
            if label in category_ids:
                results.append(_result(image_id, category_ids[label], det))
    with_masks = [r for r in results if "segmentation" in r]
    bbox, segm = _map(gt, results, "bbox"), _map(gt, with_masks, "segm")
    return {"bbox_mAP": bbox[0], "segm_mAP": segm[0], "bbox_AP50": bbox[1], "segm_AP50": segm[1],
            "images": len(gt.getImgIds()), "objects": len(gt.getAnnIds())}


def _load(coco_json: Path):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(coco_json))


def _predict_fn(detector: Union[Detector, PredictFn], score_threshold: float) -> KeyedPredictFn:
    """(image, content key of its file or None) -> detections; the key finds a stored SAM embedding."""
    if isinstance(detector, Detector):
        return lambda image, key: detector.predict(image, score_threshold=score_threshold, key=key)
    return lambda image, key: detector(image)


def _result(image_id: int, category_id: int, det: Detection) -> dict:
    from pycocotools import mask as mask_utils

    x0, y0, x1, y1 = det.bbox
    result = {"image_id": image_id, "category_id": category_id, "score": float(det.score),
              "bbox": [x0, y0, x1 - x0, y1 - y0]}
    if det.mask is not None:
        rle = mask_utils.encode(np.asfortranarray(det.mask.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode()
        result["segmentation"] = rle
    return result


def _map(gt, results: list[dict], iou_type: str) -> tuple[float, float]:
    """(AP@[.5:.95], AP@.5), all areas, up to MAX_DETECTIONS per image."""
    from pycocotools.cocoeval import COCOeval

    if not results or not gt.getAnnIds():
        return 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes([dict(r) for r in results])  # loadRes edits its input
        ev = COCOeval(gt, dt, iou_type)
        # COCO's default counts 100 detections per image; dense images (cells, crowds) hold more objects than that.
        ev.params.maxDets = [1, 10, MAX_DETECTIONS]
        ev.evaluate()
        ev.accumulate()
    # summarize() would read AP@[.5:.95] at 100 detections only: read the accumulated precision directly.
    precision = ev.eval["precision"][:, :, :, 0, -1]  # [IoU threshold, recall, class] at area "all"
    return _mean(precision), _mean(precision[0])


def _mean(values) -> float:
    kept = values[values > -1]  # -1: a class without ground truth
    return float(kept.mean()) if kept.size else 0.0
