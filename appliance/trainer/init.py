"""What a training run starts from, and how another model's classes read as the project's labels.

In order: the serving model when it has the architecture being trained (when the project's labels changed, its
head's class rows are carried over through the label map); else APPLIANCE_DETECTOR_WEIGHTS when they are of that
architecture (the admin's pretrained checkpoint, e.g. COCO's, never trained from scratch); else the architecture's
own initialisation (sam-det: SAM's pretrained encoder and decoder, a fresh head).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from appliance.labelstudio.label_map import LabelMapper, parse_label_map
from appliance.labelstudio.labeling import LabelingSpec
from appliance.models.detection import PRETRAINED_ARCH
from appliance.settings import Settings

LabelOf = Callable[[str], "str | None"]


def class_labels(settings: Settings, spec: LabelingSpec | None) -> LabelOf:
    """Model class -> project label, as the prediction backend maps them (APPLIANCE_LABEL_MAP, the template's
    predicted_values, the same name in any case)."""
    if spec is None:
        return lambda name: name
    return LabelMapper(spec, parse_label_map(settings.label_map)).label


def labels_for(model_dir: Path, labels_of: LabelOf) -> dict[str, str | None]:
    return {name: labels_of(name) for name in _classes(model_dir)}


def init_fields(settings: Settings, current_dir: Path | None, classes: list[str], labels_of: LabelOf,
                arch: str | None = None) -> dict:
    """The training job's init fields (spec.TrainingJob; none: the architecture's own initialisation) for a run
    training ``arch`` (default: APPLIANCE_TRAIN_ARCH)."""
    source = _source(settings, current_dir, arch or settings.train_arch)
    if source is None:
        return {}
    weights, source_classes, trusted = source
    fields: dict = {"init": weights, "init_trusted": trusted}
    if source_classes != classes:
        class_map = {}
        for label in classes:
            continued = [name for name in source_classes if labels_of(name) == label]
            if continued:
                class_map[label] = continued[0]
        fields.update(init_classes=source_classes, class_map=class_map)
    return fields


def _source(settings: Settings, current_dir: Path | None, arch: str) -> tuple[Path, list[str], bool] | None:
    if current_dir is not None and _arch(current_dir) == arch:
        return current_dir / "weights.pth", _classes(current_dir), False
    weights = settings.detector_weights
    if weights and arch == PRETRAINED_ARCH and Path(weights).is_file():
        from appliance.models.detection.pretrained import resolve_classes

        return Path(weights), resolve_classes(settings.detector_classes), True
    return None


def _arch(model_dir: Path) -> str | None:
    """The architecture a version was trained as (None: unreadable)."""
    try:
        from mmengine.config import Config

        return Config.fromfile(str(model_dir / "config.py")).get("arch")
    except Exception:  # noqa: BLE001 - an unreadable config initialises nothing
        return None


def _classes(model_dir: Path) -> list[str]:
    try:
        return list(json.loads((model_dir / "classes.json").read_text()))
    except (OSError, ValueError):
        return []
