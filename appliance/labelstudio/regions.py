"""Label Studio regions -> objects: which annotation of a task counts, and the objects it holds.

Regions become objects as follows:

- ``brushlabels``: Label Studio's brush RLE (a flattened HxWx4 RGBA image), pixels with alpha >= 128.
- ``polygonlabels``: points in percent of the image size, rasterised with cv2.fillPoly.
- ``rectanglelabels``: a box-only object whose mask is the filled (rotated) rectangle. For instance segmentation
  this is a coarse but valid mask; annotators who want exact outlines draw brush/polygon regions.
- ``keypointlabels`` (SAM click prompts) and any other region type are ignored.

Prompt rule: in the default template a SAM-made object carries a brush region and, when the annotator prompted with
a box (or accepted a prediction, which also ships the detector's box), a RectangleLabels region covering the same
object. A rectangle whose box overlaps the bbox of a mask object (brush or polygon) of the same label with
IoU > PROMPT_IOU is that prompt, not a second object, and is dropped.

Same-object rule: with brush and polygon in one template, SAM writes each object both ways. A polygon whose mask
overlaps a brush mask of the same label with IoU > SAME_OBJECT_IOU is that object again and is dropped (the brush
is pixel-exact; the polygon is its outline).
"""

from __future__ import annotations

import logging
from datetime import datetime

import cv2
import numpy as np

from appliance.models.sam.masks import brush_rle_to_mask

log = logging.getLogger("labelstudio.regions")

PROMPT_IOU = 0.5
SAME_OBJECT_IOU = 0.7
_MASK_TYPES = ("brushlabels", "polygonlabels")
_REGION_TYPES = ("brushlabels", "polygonlabels", "rectanglelabels")


def choose_annotation(task: dict) -> dict | None:
    """The task's ground-truth annotation if any, else its latest one; cancelled (skipped) ones never count."""
    candidates = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    if not candidates:
        return None
    return max(candidates, key=lambda a: (bool(a.get("ground_truth")),
                                          _timestamp(a.get("updated_at") or a.get("created_at")),
                                          a.get("id") or 0))


def _timestamp(value: str | None) -> float:
    if not value:
        return float("-inf")
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return float("-inf")


# --- regions -> objects ---------------------------------------------------------------------------
def annotation_objects(annotation: dict, width: int, height: int, labels: list[str]) -> list[dict]:
    """Objects {label, mask (bool HxW), bbox [x, y, w, h] in pixels} of one annotation, masks at width x height."""
    masks: list[dict] = []
    boxes: list[dict] = []
    for region in annotation.get("result") or []:
        kind = str(region.get("type", "")).lower()
        if kind not in _REGION_TYPES:
            continue
        value = region.get("value") or {}
        label = next((x for x in value.get(kind) or [] if x in labels), None)
        if label is None:
            continue
        obj = _region_object(kind, value, region, width, height)
        if obj is None:
            continue
        obj["label"], obj["kind"] = label, kind
        (masks if kind in _MASK_TYPES else boxes).append(obj)
    masks = _one_per_object(masks)
    boxes = [box for box in boxes if not _is_prompt(box, masks)]
    return masks + boxes


def _one_per_object(masks: list[dict]) -> list[dict]:
    brushes = [m for m in masks if m["kind"] == "brushlabels"]
    # Boxes first: a full-image mask IoU per brush-polygon pair would cost seconds on an image of 200 objects.
    return [m for m in masks if m["kind"] == "brushlabels" or not any(_same_object(b, m) for b in brushes)]


def _same_object(brush: dict, polygon: dict) -> bool:
    return (brush["label"] == polygon["label"] and _iou(brush["bbox"], polygon["bbox"]) > 0
            and _mask_iou(brush["mask"], polygon["mask"]) > SAME_OBJECT_IOU)


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _region_object(kind: str, value: dict, region: dict, width: int, height: int) -> dict | None:
    try:
        if kind == "brushlabels":
            mask = _brush_mask(value, region, width, height)
            bbox = None
        elif kind == "polygonlabels":
            mask = _polygon_mask(value.get("points") or [], width, height)
            bbox = None
        else:
            mask, bbox = _rectangle(value, width, height)
    except (ValueError, TypeError, KeyError) as exc:
        log.warning("skipping region %s: %s", region.get("id"), exc)
        return None
    if not mask.any():
        return None
    return {"mask": mask, "bbox": bbox or _mask_bbox(mask)}


def _brush_mask(value: dict, region: dict, width: int, height: int) -> np.ndarray:
    """The brush RLE is in the frame Label Studio saw (original_width x original_height): decode there, then
    resize to the image we write if the two differ."""
    rle = value.get("rle")
    if not rle:
        raise ValueError("brush region without rle")
    frame_w = int(region.get("original_width") or width)
    frame_h = int(region.get("original_height") or height)
    mask = brush_rle_to_mask(rle, frame_h, frame_w)
    if (frame_h, frame_w) != (height, width):
        mask = cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST).astype(bool)
    return mask


def _polygon_mask(points: list, width: int, height: int) -> np.ndarray:
    # Percent coordinates do not depend on original_width/height, so rasterise directly at the output size.
    # Rounded vertices match appliance.models.sam.masks.mask_to_polygons, which emits boundary pixel positions.
    if len(points) < 3:
        raise ValueError(f"polygon with {len(points)} points")
    pixels = np.array([[float(x) * width / 100.0, float(y) * height / 100.0] for x, y in points])
    mask = np.zeros((height, width), dtype=np.uint8)
    cv2.fillPoly(mask, [np.round(pixels).astype(np.int32)], 1)
    return mask.astype(bool)


def _rectangle(value: dict, width: int, height: int) -> tuple[np.ndarray, list[float]]:
    """Mask and bbox of a rectangle; Label Studio rotates it (degrees, clockwise) about its top-left corner."""
    x, y = float(value["x"]) * width / 100.0, float(value["y"]) * height / 100.0
    w, h = float(value["width"]) * width / 100.0, float(value["height"]) * height / 100.0
    angle = np.deg2rad(float(value.get("rotation") or 0.0))
    cos, sin = np.cos(angle), np.sin(angle)
    corners = np.array([[x + dx * cos - dy * sin, y + dx * sin + dy * cos]
                        for dx, dy in ((0, 0), (w, 0), (w, h), (0, h))])
    corners = corners.clip([0, 0], [width, height])
    mask = np.zeros((height, width), dtype=bool)
    if angle == 0:
        x0, y0 = np.round(corners[0]).astype(int)
        x1, y1 = np.round(corners[2]).astype(int)
        mask[y0:y1, x0:x1] = True
    else:
        filled = np.zeros((height, width), dtype=np.uint8)
        cv2.fillPoly(filled, [np.round(corners).astype(np.int32)], 1)
        mask = filled.astype(bool)
    (x0, y0), (x1, y1) = corners.min(axis=0), corners.max(axis=0)
    return mask, [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def _mask_bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _is_prompt(box: dict, masks: list[dict]) -> bool:
    return any(m["label"] == box["label"] and _iou(box["bbox"], m["bbox"]) > PROMPT_IOU for m in masks)


def _iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0
