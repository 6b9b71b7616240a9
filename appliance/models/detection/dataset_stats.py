"""Figures of a COCO training set that choose how a model is built (the architecture, sam-prompt's prompts)."""

from __future__ import annotations

import json
from pathlib import Path


def objects_per_image(annotations: Path) -> list[int]:
    """The number of annotated objects on each image of a COCO file (0 for an image without any)."""
    coco = json.loads(Path(annotations).read_text())
    counts = {image["id"]: 0 for image in coco.get("images", [])}
    for ann in coco.get("annotations", []):
        counts[ann["image_id"]] = counts.get(ann["image_id"], 0) + 1
    return list(counts.values())
