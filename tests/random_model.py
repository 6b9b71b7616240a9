"""A detector version with randomly initialised weights: the real model code path, no training needed."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path


def random_model(models_dir, classes: list[str], arch: str = "rtmdet-ins-tiny", max_per_img: int | None = None) -> str:
    """A registry version with randomly initialised weights (no training: the shapes are what matter). With
    ``sam-det`` only the head is random: SAM's encoder and mask decoder are the real weights, so masks are real.
    ``max_per_img`` caps its detections per image (a random head keeps the most: 200, a SAM pass each for sam-det)."""
    import torch
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    from appliance import compat
    from appliance.models.detection.configs import build_config
    from appliance.models.registry import ModelRegistry

    compat.install()
    register_all_modules()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        cfg = build_config(arch, classes, out / "work", img_size=128)
        if max_per_img is not None:
            cfg.model.test_cfg.max_per_img = max_per_img
        torch.manual_seed(0)
        model = MODELS.build(cfg.model)
        for key in ("work_dir", "load_from"):
            cfg[key] = None
        cfg.dump(str(out / "config.py"))
        torch.save({"state_dict": model.state_dict()}, out / "weights.pth")
        (out / "classes.json").write_text(json.dumps(classes))
        return ModelRegistry(models_dir).publish(out, {"source": "random"})
