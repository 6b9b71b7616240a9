"""Pretrained weights (e.g. MMDetection's COCO checkpoints) turned into a registry version."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from appliance import compat
from appliance.models.detection.configs import AUTO, DEFAULT_ARCH, arch_spec, build_config
from appliance.models.detection.model import Detector
from appliance.models.registry import ModelRegistry
from appliance.settings import PRETRAINED_ARCH

# Pretrained MMDetection checkpoints are for bundled architectures; sam-det has none of its own.
PRETRAINED_FALLBACK_ARCH = PRETRAINED_ARCH


def coco_classes() -> list[str]:
    compat.install()
    from mmdet.datasets import CocoDataset

    return list(CocoDataset.METAINFO["classes"])


def resolve_classes(spec: str) -> list[str]:
    return coco_classes() if spec.strip().lower() == "coco" else [c.strip() for c in spec.split(",") if c.strip()]


def import_pretrained(weights: Path, registry: ModelRegistry, classes: list[str], arch: str = DEFAULT_ARCH) -> str:
    """Publish ``weights`` as a new version (config, plain state dict, classes). Returns the version."""
    import torch

    if not Path(weights).is_file():
        raise FileNotFoundError(f"pretrained weights not found: {weights}")
    # An admin-provided file: official checkpoints pickle training state, so they need the trusted loader.
    checkpoint = compat.load_trusted_checkpoint(weights)
    state = checkpoint.get("state_dict", checkpoint)
    if arch == AUTO or arch_spec(arch).config is None:
        arch = PRETRAINED_FALLBACK_ARCH
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        build_config(arch, classes, out / "work").dump(str(out / "config.py"))
        torch.save({"state_dict": state}, out / "weights.pth")
        (out / "classes.json").write_text(json.dumps(classes))
        # Loaded once here, as the prediction backend will: weights that do not fit (another architecture, another
        # class count) are refused now instead of becoming a version nobody can serve.
        Detector(out, device="cpu")
        return registry.publish(out, {"source": f"pretrained {Path(weights).name}"})
