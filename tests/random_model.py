"""A detector version with randomly initialised weights: the real model code path, no training needed."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path


def random_model(models_dir, classes: list[str], arch: str = "rtmdet-ins-tiny", max_per_img: int | None = None,
                 box_px: float | None = None) -> str:
    """A registry version with randomly initialised weights (no training: the shapes are what matter). With
    ``sam-det`` only the head is random: SAM's encoder and mask decoder are the real weights, so masks are real.
    ``max_per_img`` caps its detections per image (a random head keeps the most: 200, a SAM pass each for sam-det).
    ``box_px`` (sam-det): every box is that many pixels of SAM's 1024 input frame wide, centred on its point, so each
    SAM mask is an object-sized region whatever the random scores pick (a random regression draws boxes with
    negative sides, whose masks come out empty)."""
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
        if box_px is not None:
            head = model.bbox_head
            for conv, stride in zip(head.rtm_reg, head.prior_generator.strides):
                torch.nn.init.zeros_(conv.weight)  # distances to the 4 sides: bias x stride (exp_on_reg off)
                torch.nn.init.constant_(conv.bias, box_px / 2 / stride[0])
        for key in ("work_dir", "load_from"):
            cfg[key] = None
        cfg.dump(str(out / "config.py"))
        torch.save({"state_dict": model.state_dict()}, out / "weights.pth")
        (out / "classes.json").write_text(json.dumps(classes))
        return ModelRegistry(models_dir).publish(out, {"source": "random"})
