"""Label Studio annotations -> a COCO instance-segmentation dataset for appliance.models.detection.train.

Layout written (what configs.build_config reads): ``out_dir/annotations.json`` and ``out_dir/images/<file_name>``;
image ids are Label Studio task ids, category ids are 1-based in ``labels`` order and category names equal the
labels (mmdet's CocoDataset matches categories by name), every segmentation is a COCO RLE with a str ``counts``.

Regions become objects by ``appliance.labelstudio.regions`` (which annotation counts, and its objects).
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
from pathlib import Path
from typing import Callable, Literal

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from appliance.labelstudio.images import decode_image
from appliance.labelstudio.labeling import image_url
from appliance.labelstudio.regions import annotation_objects, choose_annotation
from appliance.models.sam.cache import content_key

log = logging.getLogger("trainer.dataset")

Split = Literal["train", "holdout"]
Fetch = Callable[[str, int], bytes]

DEFAULT_MAX_PIXELS = 100_000_000  # Settings.image_max_megapixels' default


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
