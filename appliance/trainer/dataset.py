"""Label Studio annotations -> a COCO instance-segmentation dataset for appliance.models.detection.train.

Layout written (what configs.build_config reads): ``out_dir/annotations.json`` and ``out_dir/images/<file_name>``;
image ids are Label Studio task ids, category ids are 1-based in ``labels`` order and category names equal the
labels (mmdet's CocoDataset matches categories by name), every segmentation is a COCO RLE with a str ``counts``.

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

import hashlib
import io
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Literal

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from appliance.backends.images import decode_image
from appliance.backends.labeling import image_url
from appliance.models.sam.cache import content_key
from appliance.models.sam.masks import brush_rle_to_mask

log = logging.getLogger("trainer.dataset")

Split = Literal["train", "holdout"]
Fetch = Callable[[str, int], bytes]

PROMPT_IOU = 0.5
SAME_OBJECT_IOU = 0.7
DEFAULT_MAX_PIXELS = 100_000_000  # Settings.image_max_megapixels' default
_MASK_TYPES = ("brushlabels", "polygonlabels")
_REGION_TYPES = ("brushlabels", "polygonlabels", "rectanglelabels")


@dataclass
class DatasetInfo:
    images: int = 0
    objects: int = 0
    negatives: int = 0                      # images written with zero objects
    per_label: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (task id, reason)
    task_ids: list[int] = field(default_factory=list)  # the tasks written
    annotations_path: Path | None = None


# --- split and fingerprint ------------------------------------------------------------------------
def split_of(task_id: int, holdout_percent: int, seed: str = "appliance") -> Split:
    """'holdout' for about holdout_percent % of task ids, decided by a hash of seed and id only, so a task keeps
    its split as the project grows."""
    if not 0 <= holdout_percent <= 100:
        raise ValueError(f"holdout_percent must be within 0..100, got {holdout_percent}")
    digest = hashlib.sha256(f"{seed}:{int(task_id)}".encode()).digest()
    return "holdout" if int.from_bytes(digest[:8], "big") % 100 < holdout_percent else "train"


MIN_HOLDOUT_IMAGES = 3


def choose_holdout(tasks: list[dict], holdout_percent: int, minimum: int = MIN_HOLDOUT_IMAGES,
                   seed: str = "appliance") -> set[int]:
    """The task ids held out for evaluation: big enough to decide on, stable as the project grows.

    Rule: of the n tasks with a usable annotation, hold out k = max(ceil(holdout_percent % of n), minimum)
    tasks, but never more than n // 2 (training keeps at least half). Which ones: the k with the lowest hash of
    (seed, task id), so a task's place depends only on its id, and the held-out set changes little as tasks come.
    With 20 annotated tasks and the defaults that is 4 tasks (3 with 6..15 tasks, 2 with 5, 1 with 2..3).
    """
    ids = sorted({int(t["id"]) for t in tasks if choose_annotation(t) is not None}, key=lambda i: _rank(i, seed))
    k = min(max(math.ceil(len(ids) * holdout_percent / 100), minimum), len(ids) // 2)
    return set(ids[:k])


def _rank(task_id: int, seed: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{int(task_id)}".encode()).digest()[:8], "big")


def dataset_fingerprint(tasks: list[dict]) -> str:
    """Hash of (task id, chosen annotation id, its updated_at) over all tasks: changes whenever the data would."""
    rows = []
    for task in tasks:
        chosen = choose_annotation(task)
        rows.append([task.get("id"), chosen and chosen.get("id"),
                     chosen and (chosen.get("updated_at") or chosen.get("created_at"))])
    rows.sort(key=lambda row: (row[0] is None, str(row[0])))
    return hashlib.sha256(json.dumps(rows, default=str).encode()).hexdigest()


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


# --- build ----------------------------------------------------------------------------------------
def build_dataset(tasks: list[dict], labels: list[str], out_dir: Path, fetch: Fetch, split: Split,
                  holdout_percent: int, image_cache: Path, *, image_key: str = "image",
                  max_pixels: int = DEFAULT_MAX_PIXELS, seed: str = "appliance",
                  holdout_ids: set[int] | None = None) -> DatasetInfo:
    """Write out_dir/annotations.json + out_dir/images/ from the tasks of `split`.

    A task without a usable annotation or whose image cannot be fetched or decoded is recorded in
    `skipped` and left out; the build itself never fails on one task.
    """
    if split not in ("train", "holdout"):
        raise ValueError(f"split must be 'train' or 'holdout', got {split!r}")
    out_dir, image_cache = Path(out_dir), Path(image_cache)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    image_cache.mkdir(parents=True, exist_ok=True)
    info = DatasetInfo(per_label={label: 0 for label in labels})
    images: list[dict] = []
    annotations: list[dict] = []
    for task in sorted(tasks, key=lambda t: int(t["id"])):
        task_id = int(task["id"])
        held_out = task_id in holdout_ids if holdout_ids is not None else \
            split_of(task_id, holdout_percent, seed) == "holdout"
        if ("holdout" if held_out else "train") != split:
            continue
        annotation = choose_annotation(task)
        if annotation is None:
            info.skipped.append((task_id, "no annotation that is not cancelled"))
            continue
        try:
            url = image_url(task, image_key)
            data = _cached_fetch(url, task_id, fetch, image_cache)
            pixels = decode_image(data, max_pixels)
            objects = annotation_objects(annotation, pixels.shape[1], pixels.shape[0], labels)
            file_name = _write_image(pixels, out_dir / "images", task_id, is_jpeg=data[:2] == b"\xff\xd8")
        except Exception as exc:  # noqa: BLE001 - one bad task must not abort the build
            info.skipped.append((task_id, f"{type(exc).__name__}: {exc}"))
            continue
        info.task_ids.append(task_id)
        # content_key: the key of the image's SAM embedding in the shared store (sam-det trains on it).
        # url and annotation: what `appliance export --version` needs to give this exact set back later.
        images.append({"id": task_id, "file_name": file_name, "width": int(pixels.shape[1]),
                       "height": int(pixels.shape[0]), "content_key": content_key(data), "url": url,
                       "annotation_id": annotation.get("id"),
                       "annotation_updated_at": annotation.get("updated_at") or annotation.get("created_at")})
        for obj in objects:
            annotations.append(_coco_annotation(len(annotations) + 1, task_id, obj, labels))
            info.per_label[obj["label"]] += 1
        if not objects:
            info.negatives += 1
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": label} for i, label in enumerate(labels)]}
    info.annotations_path = out_dir / "annotations.json"
    _write_atomic(info.annotations_path, json.dumps(coco).encode())
    info.images, info.objects = len(images), len(annotations)
    return info


def _cached_fetch(url: str, task_id: int, fetch: Fetch, cache: Path) -> bytes:
    path = cache / hashlib.sha256(url.encode()).hexdigest()
    if path.is_file():
        return path.read_bytes()
    data = fetch(url, task_id)
    _write_atomic(path, data)
    return data


def _write_image(pixels: np.ndarray, directory: Path, task_id: int, is_jpeg: bool) -> str:
    """Re-encoded without EXIF (orientation already applied): JPEG (quality 95) for JPEG sources, which are lossy
    anyway and would balloon as PNG; PNG otherwise."""
    name = f"{task_id}.jpg" if is_jpeg else f"{task_id}.png"
    buffer = io.BytesIO()
    if is_jpeg:
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    else:
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    _write_atomic(directory / name, buffer.getvalue())
    return name


def _coco_annotation(ann_id: int, image_id: int, obj: dict, labels: list[str]) -> dict:
    rle = mask_utils.encode(np.asfortranarray(obj["mask"].astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return {"id": ann_id, "image_id": image_id, "category_id": labels.index(obj["label"]) + 1,
            "segmentation": rle, "area": int(mask_utils.area(rle)),
            "bbox": [round(float(v), 2) for v in obj["bbox"]], "iscrowd": 0}


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
