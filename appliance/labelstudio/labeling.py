"""What a backend needs to know of a labeling template, and how its regions look (Label Studio's JSON format)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from label_studio_sdk.label_interface import LabelInterface

from appliance.models.sam.masks import mask_to_brush_rle, mask_to_polygons


class LabelingError(ValueError):
    """The template lacks something a backend needs; the message says what to add."""


@dataclass(frozen=True)
class LabelingSpec:
    image_name: str
    image_key: str
    controls: dict[str, str] = field(default_factory=dict)  # tag (e.g. "BrushLabels") -> control name
    labels: dict[str, tuple[str, ...]] = field(default_factory=dict)  # control name -> its labels
    predicted_values: dict[str, tuple[str, ...]] = field(default_factory=dict)  # label -> model class names

    def control(self, tag: str) -> str | None:
        return self.controls.get(tag)

    def require(self, tag: str) -> str:
        name = self.controls.get(tag)
        if name is None:
            raise LabelingError(f"the labeling template has no <{tag}> for <Image name={self.image_name!r}>; add one")
        return name

    def check_label(self, control: str, label: str) -> None:
        if label not in self.labels.get(control, ()):
            raise LabelingError(f"label {label!r} is not in <{control}>'s labels {list(self.labels.get(control, ()))}"
                                f"; add <Label value={label!r}/> to the template")


@lru_cache(maxsize=64)
def parse(config: str) -> LabelingSpec:
    """The first Image and the controls drawing on it (first of each tag wins)."""
    try:
        interface = LabelInterface(config)
    except Exception as error:  # the SDK raises several kinds for a bad template
        raise LabelingError(f"the labeling template cannot be parsed: {error}") from None
    images = [o for o in interface.objects if o.tag == "Image"]
    if not images:
        raise LabelingError("the labeling template has no <Image>; these backends label images")
    image = images[0]
    controls: dict[str, str] = {}
    labels: dict[str, tuple[str, ...]] = {}
    predicted: dict[str, tuple[str, ...]] = {}
    for control in interface.controls:
        if image.name in (control.to_name or []) and control.tag not in controls:
            controls[control.tag] = control.name
            labels[control.name] = tuple(getattr(control, "labels", None) or ())
            for label, tag in (getattr(control, "labels_attrs", None) or {}).items():
                values = (tag.attr or {}).get("predicted_values")
                if values:
                    predicted[label] = tuple(v.strip() for v in values.split(",") if v.strip())
    return LabelingSpec(image.name, image.value.lstrip("$"), controls, labels, predicted)


def image_url(task: dict, image_key: str) -> str:
    """The task's image URL under ``image_key`` (the template's ``$image`` without the dollar)."""
    data = task.get("data") or {}
    # Tasks made by a storage sync carry the image under "$undefined$" until Label Studio resolves it.
    for key in (image_key, "$undefined$"):
        if isinstance(data.get(key), str) and data[key]:
            return data[key]
    raise LabelingError(f"task {task.get('id')} has no image under data[{image_key!r}]")


def _region(spec: LabelingSpec, control: str, kind: str, value: dict, size: tuple[int, int],
            score: float | None) -> dict:
    height, width = size
    region = {"id": uuid.uuid4().hex[:10], "from_name": control, "to_name": spec.image_name, "type": kind,
              "original_width": width, "original_height": height, "image_rotation": 0, "value": value}
    if score is not None:
        region["score"] = round(float(score), 4)
    return region


def brush_region(spec: LabelingSpec, mask: np.ndarray, label: str, score: float | None) -> dict:
    control = spec.require("BrushLabels")
    value = {"format": "rle", "rle": mask_to_brush_rle(mask), "brushlabels": [label]}
    return _region(spec, control, "brushlabels", value, mask.shape[:2], score)


def polygon_regions(spec: LabelingSpec, mask: np.ndarray, label: str, score: float | None) -> list[dict]:
    control = spec.control("PolygonLabels")
    if control is None:
        return []
    polygons = mask_to_polygons(mask)
    return [_region(spec, control, "polygonlabels", {"points": points, "polygonlabels": [label], "closed": True},
                    mask.shape[:2], score) for points in polygons[:1]]


MASK_OUTPUTS = ("BrushLabels", "PolygonLabels")
LEARNT_TAGS = ("BrushLabels", "PolygonLabels", "RectangleLabels")  # the regions a detector learns from


def model_labels(spec: LabelingSpec) -> list[str]:
    """The classes a detector learns: the labels of the template's brush, polygon and rectangle controls, in order."""
    labels: list[str] = []
    for tag in LEARNT_TAGS:
        for label in spec.labels.get(spec.controls.get(tag, ""), ()):
            if label not in labels:
                labels.append(label)
    if not labels:
        raise LabelingError("the template has no BrushLabels, PolygonLabels or RectangleLabels to learn")
    return labels


def output_controls(spec: LabelingSpec) -> list[str]:
    """The controls a mask is written to: brush and polygon when the template has them, else a (tight) box."""
    found = [spec.controls[tag] for tag in MASK_OUTPUTS if tag in spec.controls]
    if not found and "RectangleLabels" in spec.controls:
        found = [spec.controls["RectangleLabels"]]
    if not found:
        raise LabelingError(f"the labeling template has no <BrushLabels>, <PolygonLabels> or <RectangleLabels> for "
                            f"<Image name={spec.image_name!r}>; add one for the masks")
    return found


def mask_regions(spec: LabelingSpec, mask: np.ndarray, label: str, score: float | None) -> list[dict]:
    """One object's mask in each of the template's output kinds (``output_controls``)."""
    regions = []
    controls = output_controls(spec)
    if spec.control("BrushLabels") in controls:
        regions.append(brush_region(spec, mask, label, score))
    if spec.control("PolygonLabels") in controls:
        regions += polygon_regions(spec, mask, label, score)
    if spec.control("RectangleLabels") in controls:
        ys, xs = np.nonzero(mask)
        if len(xs):
            bbox = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
            regions.append(rectangle_region(spec, bbox, mask.shape[:2], label, score))
    return regions


def rectangle_region(spec: LabelingSpec, bbox: tuple[float, float, float, float], size: tuple[int, int],
                     label: str, score: float | None) -> dict | None:
    control = spec.control("RectangleLabels")
    if control is None:
        return None
    height, width = size
    x0, y0, x1, y1 = bbox
    value = {"x": 100 * x0 / width, "y": 100 * y0 / height, "width": 100 * (x1 - x0) / width,
             "height": 100 * (y1 - y0) / height, "rotation": 0, "rectanglelabels": [label]}
    return _region(spec, control, "rectanglelabels", value, size, score)
