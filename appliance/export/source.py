"""What an export holds: Items (one image each, its objects as COCO RLE), read from Label Studio or a snapshot.

From Label Studio the tasks are read page by page (ids from the task list with ``review=true``, which never asks
the ML backends for predictions; the tasks themselves from the project export endpoint for those ids), so a
project of 50 000 tasks never sits in memory at once. Regions become objects exactly as the trainer reads them
(appliance.labelstudio.regions.annotation_objects): brush masks pixel for pixel, polygons rasterised, boxes as filled
rectangles, a SAM prompt box dropped where it covers its own mask.

From a model version: the COCO files its training run wrote (``<version>/dataset-{train,holdout}.json``), each
image carrying its task id, image URL and the annotation it came from, so `--version` gives exactly that training
set and its held-out split, whatever was edited since.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from appliance.labelstudio.regions import annotation_objects, choose_annotation

PAGE = 200
SPLITS = ("train", "holdout")


class ExportError(RuntimeError):
    """The export cannot be made; the message says why and what to do."""


@dataclass
class Item:
    task_id: int
    url: str
    width: int
    height: int
    objects: list[dict] = field(default_factory=list)  # {label, rle (str counts), bbox [x, y, w, h], area}
    split: str | None = None  # train / holdout (a version's snapshot), None for a live export
    source: str = "annotation"  # annotation / prediction
    annotation_id: int | None = None
    updated_at: str | None = None
    task: dict | None = None  # the raw task (label-studio format only)

    def mask(self, obj: dict) -> np.ndarray:
        return mask_utils.decode(obj["rle"]).astype(bool)


def encode(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def compact(obj: dict) -> dict:
    """An object of annotation_objects (dense mask) as the small record exports keep."""
    rle = encode(obj["mask"])
    return {"label": obj["label"], "rle": rle, "bbox": [round(float(v), 2) for v in obj["bbox"]],
            "area": int(mask_utils.area(rle))}


# --- from Label Studio ----------------------------------------------------------------------------
def frame_size(result: list[dict]) -> tuple[int, int] | None:
    """(width, height) of the image as Label Studio saw it, from any region that says."""
    for region in result:
        if region.get("original_width") and region.get("original_height"):
            return int(region["original_width"]), int(region["original_height"])
    return None


def labelled(task: dict, predictions_of=None) -> tuple[str, dict] | None:
    """("annotation", the annotation) or, given ``predictions_of(task_id)`` (the task's predictions: Label
    Studio's export lists only their ids), ("prediction", the newest prediction); None: nothing to export."""
    annotation = choose_annotation(task)
    if annotation is not None:
        return "annotation", annotation
    if predictions_of is None or not task.get("predictions"):
        return None
    predictions = [p for p in predictions_of(int(task["id"])) if isinstance(p, dict) and p.get("result")]
    if predictions:
        return "prediction", max(predictions, key=lambda p: (str(p.get("created_at") or ""), p.get("id") or 0))
    return None


def item_of(task: dict, labels: list[str], image_key: str, predictions_of=None,
            size_of=None, keep_task: bool = False) -> Item | None:
    """The Item of one Label Studio task; ``size_of(url, task_id)`` gives (w, h) when no region says."""
    from appliance.labelstudio.labeling import image_url

    chosen = labelled(task, predictions_of)
    if chosen is None:
        return None
    source, annotation = chosen
    result = annotation.get("result") or []
    url = image_url(task, image_key)
    size = frame_size(result) or (size_of(url, int(task["id"])) if size_of else None)
    if size is None:
        raise ExportError(f"task {task['id']}: no region says the image size and the image was not read")
    width, height = size
    objects = [compact(o) for o in annotation_objects(annotation, width, height, labels)]
    return Item(int(task["id"]), url, width, height, objects, source=source,
                annotation_id=annotation.get("id"), updated_at=annotation.get("updated_at"),
                task=task if keep_task else None)


def studio_tasks(studio, project_id: int, page: int = PAGE) -> Iterator[dict]:
    """Every task of the project with its annotations and predictions, ``page`` at a time."""
    number = 1
    while True:
        listing = studio.get("/api/tasks", "listing the tasks",
                             params={"project": project_id, "page": number, "page_size": page, "review": "true"})
        ids = [t["id"] for t in (listing.get("tasks") if isinstance(listing, dict) else listing) or []]
        if not ids:
            return
        tasks = studio.get(f"/api/projects/{project_id}/export", "exporting tasks",
                           params={"exportType": "JSON", "download_all_tasks": "true", "ids[]": ids})
        yield from sorted(tasks, key=lambda t: t["id"])
        total = listing.get("total") if isinstance(listing, dict) else None
        if len(ids) < page or (total is not None and number * page >= total):
            return
        number += 1


# --- from a model version's snapshot -------------------------------------------------------------------
def snapshot_paths(version_dir: Path) -> dict[str, Path]:
    return {split: version_dir / snapshot_name(split) for split in SPLITS}


def snapshot_name(split: str) -> str:
    """Flat names: a version folder is copied file by file between machines (appliance.shared.registry)."""
    return f"dataset-{split}.json"


def snapshot_items(version_dir: Path) -> tuple[list[str], Iterator[Item]]:
    """The labels and Items of the dataset a version was trained and evaluated on."""
    paths = snapshot_paths(version_dir)
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise ExportError(f"{version_dir.name} has no dataset snapshot ({missing[0]} is missing): versions "
                          f"published before snapshots were kept cannot be exported by --version")
    cocos = {split: json.loads(path.read_text()) for split, path in paths.items()}
    categories = sorted(cocos["train"]["categories"], key=lambda c: c["id"])
    labels = [c["name"] for c in categories]

    def items() -> Iterator[Item]:
        for split, coco in cocos.items():
            names = {c["id"]: c["name"] for c in coco["categories"]}
            objects: dict[int, list[dict]] = {}
            for ann in coco["annotations"]:
                objects.setdefault(ann["image_id"], []).append(
                    {"label": names[ann["category_id"]], "rle": ann["segmentation"], "bbox": ann["bbox"],
                     "area": ann["area"]})
            for image in coco["images"]:
                yield Item(int(image["id"]), image.get("url", ""), int(image["width"]), int(image["height"]),
                           objects.get(image["id"], []), split=split, annotation_id=image.get("annotation_id"),
                           updated_at=image.get("annotation_updated_at"))

    return labels, items()
