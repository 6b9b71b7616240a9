"""The export formats. Each writer takes Items one at a time (and the image's bytes when images are included) and
writes its files under one folder; a version's export puts each split in its own subfolder or file.

    coco         annotations.json (train.json and holdout.json for a version): instance segmentation, masks as
                 COCO RLE exactly as annotated, boxes, categories in template order, iscrowd 0, coco_url = the
                 task's image URL; pycocotools.coco.COCO reads it
    yolo-seg     Ultralytics' segmentation layout: labels/<split>/<task>.txt, one line per object
                 "class x1 y1 x2 y2 ..." (normalised; one polygon per object, see polygons.py), data.yaml
    masks        instances/<task>.png (uint16: 0 background, 1..n the objects in annotation order; where objects
                 overlap the later one wins) and classes/<task>.png (uint8: 0 background, else category id)
    label-studio tasks.json: the tasks as Label Studio's JSON export writes them (live exports only)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from appliance.export.polygons import mask_polygon
from appliance.export.source import ExportError, Item

FORMATS = ("coco", "yolo-seg", "masks", "label-studio")


def image_name(item: Item, data: bytes | None) -> str:
    return f"{item.task_id}{image_suffix(item.url, data)}"


def image_suffix(url: str, data: bytes | None) -> str:
    if data is not None:
        if data[:2] == b"\xff\xd8":
            return ".jpg"
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            return ".png"
    suffix = Path(url.split("?", 1)[0]).suffix.lower()
    return suffix if suffix in (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif") else ".jpg"


def _sub(item: Item) -> str:
    return f"{item.split}/" if item.split else ""


class Writer:
    images_dir = "images"

    def __init__(self, out: Path, labels: list[str], splits: tuple[str, ...] = ()):
        self.out = out
        self.labels = labels
        self.splits = set(splits)  # a version's: each gets its file or folder even when it holds no image
        self.category = {label: i + 1 for i, label in enumerate(labels)}
        self.images = 0
        self.objects = 0

    def add(self, item: Item, data: bytes | None) -> None:
        name = image_name(item, data)
        if data is not None:
            write_file(self.out / self.images_dir / f"{_sub(item)}{name}", data)
        self.write(item, name)
        self.images += 1
        self.objects += len(item.objects)

    def write(self, item: Item, name: str) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        pass


class CocoWriter(Writer):
    """Images and annotations are streamed to part files and joined at the end: memory stays flat."""

    def __init__(self, out: Path, labels: list[str], splits: tuple[str, ...] = ()):
        super().__init__(out, labels, splits)
        self.parts: dict[str, dict] = {}
        for split in splits:
            self._part(split)

    def _part(self, split: str | None) -> dict:
        key = split or "annotations"
        if key not in self.parts:
            self.out.mkdir(parents=True, exist_ok=True)
            self.parts[key] = {"images": open(self.out / f".{key}.images", "w"),
                               "annotations": open(self.out / f".{key}.annotations", "w"), "next_id": 1}
        return self.parts[key]

    def write(self, item: Item, name: str) -> None:
        part = self._part(item.split)
        image = {"id": item.task_id, "file_name": name, "width": item.width, "height": item.height,
                 "coco_url": item.url}
        _append(part["images"], image)
        for obj in item.objects:
            ann = {"id": part["next_id"], "image_id": item.task_id, "category_id": self.category[obj["label"]],
                   "segmentation": obj["rle"], "area": obj["area"], "bbox": obj["bbox"], "iscrowd": 0}
            part["next_id"] += 1
            _append(part["annotations"], ann)

    def finish(self) -> None:
        categories = json.dumps([{"id": i, "name": label, "supercategory": ""} for label, i in self.category.items()])
        for key, part in self.parts.items():
            for handle in (part["images"], part["annotations"]):
                handle.close()
            target = self.out / f"{key}.json"
            with open(target.with_name(f".{target.name}.tmp"), "w") as out:
                out.write('{"info": {"description": "exported by appliance export"}, "licenses": [], "images": [')
                _copy_joined(self.out / f".{key}.images", out)
                out.write('], "annotations": [')
                _copy_joined(self.out / f".{key}.annotations", out)
                out.write(f'], "categories": {categories}}}')
            os.replace(target.with_name(f".{target.name}.tmp"), target)
            for suffix in ("images", "annotations"):
                (self.out / f".{key}.{suffix}").unlink()


class YoloSegWriter(Writer):
    def write(self, item: Item, name: str) -> None:
        lines = []
        for obj in item.objects:
            polygon = mask_polygon(item.mask(obj))
            if polygon is None:
                continue
            coords = (polygon / np.array([item.width, item.height])).clip(0, 1).ravel()
            lines.append(" ".join([str(self.category[obj["label"]] - 1)] + [f"{v:.6f}" for v in coords]))
        write_file(self.out / "labels" / f"{_sub(item)}{Path(name).stem}.txt",
                   ("\n".join(lines) + "\n" if lines else "").encode())

    def finish(self) -> None:
        train, val = ("images/train", "images/holdout") if self.splits else ("images", "images")
        names = "\n".join(f"  {i}: {json.dumps(label)}" for i, label in enumerate(self.labels))
        write_file(self.out / "data.yaml",
                   f"# Ultralytics YOLO segmentation dataset written by `appliance export --format yolo-seg`.\n"
                   f"# One polygon per object: holes and separate parts are joined by zero-width bridges.\n"
                   f"path: .\ntrain: {train}\nval: {val}\nnames:\n{names}\n".encode())


class MasksWriter(Writer):
    def write(self, item: Item, name: str) -> None:
        if len(item.objects) > 65535:
            raise ExportError(f"task {item.task_id} has more than 65535 objects: too many for a 16-bit PNG")
        instances = np.zeros((item.height, item.width), dtype=np.uint16)
        classes = np.zeros((item.height, item.width), dtype=np.uint8)
        for index, obj in enumerate(item.objects, start=1):
            mask = item.mask(obj)
            instances[mask] = index
            classes[mask] = self.category[obj["label"]]
        stem = Path(name).stem
        write_png(self.out / "instances" / f"{_sub(item)}{stem}.png", instances)
        write_png(self.out / "classes" / f"{_sub(item)}{stem}.png", classes)

    def finish(self) -> None:
        write_file(self.out / "classes.json",
                   json.dumps({"0": "background", **{str(i): label for label, i in self.category.items()}},
                              indent=1).encode())


class LabelStudioWriter(Writer):
    def write(self, item: Item, name: str) -> None:
        if item.task is None:
            raise ExportError("the label-studio format exports the project's tasks as they are now; a version's "
                              "snapshot keeps masks, not Label Studio's JSON: use --format coco with --version")
        if not hasattr(self, "handle"):
            self.out.mkdir(parents=True, exist_ok=True)
            self.handle = open(self.out / ".tasks.json.tmp", "w")
            self.handle.write("[")
        else:
            self.handle.write(",")
        self.handle.write("\n" + json.dumps(item.task))

    def finish(self) -> None:
        if not hasattr(self, "handle"):
            write_file(self.out / "tasks.json", b"[]\n")
            return
        self.handle.write("\n]\n")
        self.handle.close()
        os.replace(self.out / ".tasks.json.tmp", self.out / "tasks.json")


WRITERS = {"coco": CocoWriter, "yolo-seg": YoloSegWriter, "masks": MasksWriter, "label-studio": LabelStudioWriter}


def writer(fmt: str, out: Path, labels: list[str], splits: tuple[str, ...] = ()) -> Writer:
    if fmt not in WRITERS:
        raise ExportError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    return WRITERS[fmt](out, labels, splits)


def _append(handle, record: dict) -> None:
    if handle.tell():
        handle.write(",")
    handle.write(json.dumps(record))


def _copy_joined(path: Path, out) -> None:
    with open(path) as handle:
        while chunk := handle.read(1 << 20):
            out.write(chunk)


def write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(pixels).save(tmp, format="PNG")
    os.replace(tmp, path)
