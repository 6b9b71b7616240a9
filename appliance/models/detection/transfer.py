"""Start a training run from another model's weights when the class lists differ.

The head's class rows are carried over through the label map (target label <- the source class it continues);
a label with no source class keeps the fresh initialisation, and source classes the project does not use are
dropped. Everything else whose shape fits is loaded as is (mmengine's ``load_from`` skips what does not fit).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("train.transfer")

# Layers whose first dimension runs over classes: RTMDet's (and sam-det's) classification convs, Mask R-CNN's box
# classifier (+1 background row), class-specific box regression (4 rows a class) and mask logits.
CLASS_LAYERS = ("rtm_cls", "fc_cls", "fc_reg", "conv_logits")


def source_rows(source_classes: list[str], target_classes: list[str], class_map: dict[str, str]) -> list[int | None]:
    """For each target class, the index of the source class it continues: ``class_map[target]`` when given,
    otherwise the source class of the same name (any case); None for a new class."""
    index = {name.lower(): i for i, name in enumerate(source_classes)}
    return [index.get((class_map.get(target) or target).lower()) for target in target_classes]


def remap_state(source: dict, fresh: dict, rows: list[int | None], n_source: int) -> dict:
    """The state to start from: ``fresh`` (the new model's own initialisation) overwritten with what the source
    model has of the same shape, and the class layers' rows picked by ``rows``."""
    state = {}
    for key, init in fresh.items():
        old = source.get(key)
        if old is None:
            continue  # not in the source (e.g. sam-det's frozen SAM parts): the model's own init stays
        if _is_class_layer(key):
            state[key] = _pick_rows(old, init, rows, n_source)
        elif tuple(old.shape) == tuple(init.shape):
            state[key] = old
    return state


def _is_class_layer(key: str) -> bool:
    return any(f".{name}." in f".{key}" for name in CLASS_LAYERS)


def _pick_rows(old: Any, init: Any, rows: list[int | None], n_source: int) -> Any:
    """Rows per class come in blocks of k (k = 4 for box regression); a trailing background row is kept."""
    n_target = len(rows)
    background = old.shape[0] == n_source + 1 and init.shape[0] == n_target + 1
    k = 1 if background else old.shape[0] // n_source
    if not background and (old.shape[0] != k * n_source or init.shape[0] != k * n_target):
        return init  # a layout this does not know: fresh
    if tuple(old.shape[1:]) != tuple(init.shape[1:]):
        return init
    new = init.clone()
    for target, source in enumerate(rows):
        if source is not None:
            new[target * k:(target + 1) * k] = old[source * k:(source + 1) * k]
    if background:
        new[-1] = old[-1]
    return new


def load_weights(path: Path, trusted: bool = False) -> dict:
    """The state dict of a weights file: ours (a plain state dict) or, when ``trusted`` (a file the admin named),
    a full training checkpoint."""
    import torch

    if trusted:
        from appliance import compat

        checkpoint = compat.load_trusted_checkpoint(path)
    else:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return checkpoint.get("state_dict", checkpoint)


def mapped_init(cfg: Any, weights: Path, source_classes: list[str], target_classes: list[str],
                class_map: dict[str, str], out: Path, trusted: bool = False) -> Path:
    """Write the starting weights for a run of ``cfg`` (classes ``target_classes``) to ``out``."""
    import torch
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules()
    rows = source_rows(source_classes, target_classes, class_map)
    torch.manual_seed(0)
    fresh = MODELS.build(cfg.model).state_dict()
    state = remap_state(load_weights(weights, trusted), fresh, rows, len(source_classes))
    carried = {t: source_classes[r] for t, r in zip(target_classes, rows) if r is not None}
    log.warning("starting from %s: classes carried over %s; new %s", Path(weights).name, carried,
                [t for t, r in zip(target_classes, rows) if r is None])
    torch.save({"state_dict": state}, out)
    return out
