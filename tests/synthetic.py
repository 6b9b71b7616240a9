"""Synthetic COCO instance-segmentation sets: filled shapes on noisy backgrounds.

Class 0 is drawn as filled circles, class 1 as rectangles, class 2 as triangles,
further classes cycle through the shapes with other colours. Circles get RLE
masks, the others polygons, so both COCO mask formats are exercised.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

SHAPES = ("circle", "rectangle", "triangle")
COLOURS = ((220, 40, 40), (40, 200, 60), (50, 80, 230), (230, 200, 30))


def make_dataset(directory: Path, n_images: int, classes: list[str],
                 size: tuple[int, int] = (320, 240), seed: int = 0) -> Path:
    """Write directory/annotations.json + directory/images/*.png; return the json path."""
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for image_id in range(1, n_images + 1):
        name = f"img_{image_id:04d}.png"
        image, objects = make_image(rng, len(classes), size)
        image.save(directory / "images" / name)
        images.append({"id": image_id, "file_name": name, "width": size[0], "height": size[1]})
        for class_index, segmentation, mask in objects:
            annotations.append(_annotation(len(annotations) + 1, image_id, class_index + 1,
                                           segmentation, mask))
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": c} for i, c in enumerate(classes)],
    }
    path = directory / "annotations.json"
    path.write_text(json.dumps(coco))
    return path


def make_image(rng: np.random.Generator, n_classes: int, size: tuple[int, int] = (320, 240),
               n_objects: tuple[int, int] = (1, 4)) -> tuple[Image.Image, list]:
    """An RGB image and its non-overlapping objects as (class_index, segmentation, bool mask)."""
    width, height = size
    noise = rng.normal(120, 30, (height, width, 3)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(noise)
    taken = np.zeros((height, width), dtype=bool)
    objects = []
    for _ in range(int(rng.integers(n_objects[0], n_objects[1] + 1))):
        for _attempt in range(10):
            class_index = int(rng.integers(n_classes))
            shape = _random_shape(rng, class_index, size)
            mask = _mask(shape, size)
            if not (mask & taken).any():
                break
        else:
            continue
        taken |= mask
        _paint(image, shape, COLOURS[class_index % len(COLOURS)])
        objects.append((class_index, _segmentation(shape, mask), mask))
    return image, objects


def _random_shape(rng: np.random.Generator, class_index: int,
                  size: tuple[int, int]) -> tuple[str, list]:
    width, height = size
    r = int(rng.integers(min(size) // 10, min(size) // 4))
    cx, cy = int(rng.integers(r, width - r)), int(rng.integers(r, height - r))
    kind = SHAPES[class_index % len(SHAPES)]
    if kind == "circle":
        return kind, [(cx - r, cy - r), (cx + r, cy + r)]
    if kind == "rectangle":
        h = int(r * rng.uniform(0.5, 1.0))
        return kind, [(cx - r, cy - h), (cx + r, cy - h), (cx + r, cy + h), (cx - r, cy + h)]
    return kind, [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]


def _paint(target: Image.Image, shape: tuple[str, list], fill: object) -> None:
    kind, points = shape
    draw = ImageDraw.Draw(target)
    if kind == "circle":
        draw.ellipse(points, fill=fill)
    else:
        draw.polygon(points, fill=fill)


def _mask(shape: tuple[str, list], size: tuple[int, int]) -> np.ndarray:
    canvas = Image.new("L", size, 0)
    _paint(canvas, shape, 1)
    return np.array(canvas, dtype=bool)


def _segmentation(shape: tuple[str, list], mask: np.ndarray) -> object:
    kind, points = shape
    if kind == "circle":
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": rle["size"], "counts": rle["counts"].decode()}
    return [[float(v) for p in points for v in p]]


def _annotation(ann_id: int, image_id: int, category_id: int, segmentation: object,
                mask: np.ndarray) -> dict:
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    return {
        "id": ann_id, "image_id": image_id, "category_id": category_id,
        "segmentation": segmentation, "area": float(mask.sum()),
        "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], "iscrowd": 0,
    }
