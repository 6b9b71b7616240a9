"""SAM prompts from an interactive request's context: the clicks and box of the object being drawn.

Label Studio sends the pending smart regions of the annotation in ``params.context.result``: every smart region
of the newest one's type and label (``getConnectedDynamicRegions`` in its editor). Only the prompts of that label
count: the newest prompt's label, and the run of prompts with that label that ends with it. They stay in click
order (which object each belongs to is decided with their masks, in ``models/sam/objects.py``) and in percent of
the image, as Label Studio sends them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from appliance.models.sam.engine import PromptError

PROMPT_TYPES = {"keypointlabels", "rectanglelabels"}


@dataclass(frozen=True)
class Prompt:
    point: tuple[float, float] | None = None  # x, y in percent
    positive: bool = True
    box: tuple[float, float, float, float] | None = None  # x, y, width, height in percent


@dataclass
class Prompts:
    label: str
    items: list[Prompt] = field(default_factory=list)  # in click order
    original_size: tuple[int, int] | None = None  # (height, width) Label Studio shows


def _label(region: dict) -> str:
    value = region.get("value") or {}
    labels = value.get(region.get("type"))
    if not isinstance(labels, list) or not labels or not isinstance(labels[0], str):
        raise PromptError(f"a {region.get('type')} prompt carries no label; pick a label before clicking")
    return labels[0]


def _number(value: dict, key: str) -> float:
    number = value.get(key)
    if not isinstance(number, (int, float)) or isinstance(number, bool) or abs(number) > 1e300:  # float() fits
        raise PromptError(f"prompt coordinate {key!r} is missing or not a number")
    return float(number)


def _size(region: dict) -> tuple[int, int] | None:
    width, height = region.get("original_width"), region.get("original_height")
    if type(width) is int and type(height) is int and width > 0 and height > 0:  # bool is no size
        return height, width
    return None


def select_prompts(context: dict) -> Prompts:
    result = context.get("result")
    regions = [r for r in (result if isinstance(result, list) else []) if isinstance(r, dict)
               and r.get("type") in PROMPT_TYPES and isinstance(r.get("value") or {}, dict)]
    if any("is_positive" in r for r in regions):
        # Label Studio marks its live smart keypoints with is_positive; one without it was restored from a saved
        # draft (its mask was accepted or dropped back then) and is no prompt of the object being drawn now.
        regions = [r for r in regions if r["type"] != "keypointlabels" or "is_positive" in r]
    if not regions:
        raise PromptError("no SAM prompt in the request: place a smart keypoint or draw a smart box")
    label = _label(regions[-1])
    run = []
    for region in reversed(regions):
        if _label(region) != label:
            break
        run.append(region)
    prompts = Prompts(label=label, original_size=_size(regions[-1]))
    for region in reversed(run):
        value = region.get("value") or {}
        if region["type"] == "keypointlabels":
            prompts.items.append(Prompt(point=(_number(value, "x"), _number(value, "y")),
                                        positive=region.get("is_positive") is not False))
        else:
            prompts.items.append(Prompt(box=(_number(value, "x"), _number(value, "y"), _number(value, "width"),
                                             _number(value, "height"))))
    return prompts
