"""Pretrained weights (e.g. MMDetection's COCO checkpoints) turned into a registry version."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from appliance import compat
from appliance.models.detection import PRETRAINED_ARCH
from appliance.models.detection.configs import AUTO, DEFAULT_ARCH, arch_spec, build_config
from appliance.models.detection.model import Detector
from appliance.models.files import weights_file
from appliance.models.registry import ModelRegistry

# Pretrained MMDetection checkpoints are for bundled architectures; sam-det has none of its own.
PRETRAINED_FALLBACK_ARCH = PRETRAINED_ARCH


def coco_classes() -> list[str]:
    compat.install()
    from mmdet.datasets import CocoDataset

    return list(CocoDataset.METAINFO["classes"])


def resolve_classes(spec: str) -> list[str]:
    return coco_classes() if spec.strip().lower() == "coco" else [c.strip() for c in spec.split(",") if c.strip()]


class PretrainedError(ValueError):
    """APPLIANCE_DETECTOR_WEIGHTS cannot be an MMDetection detector's weights."""


def inspect_weights(weights: Path) -> None:
    """Refuse, before any program starts, weights that are missing, empty, not a PyTorch checkpoint or not a
    detector's state dict (whether they fit the architecture is checked when they are imported)."""
    import torch

    weights = weights_file(weights, PretrainedError)
    try:
        checkpoint = compat.load_trusted_checkpoint(weights)
    except Exception as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise PretrainedError(f"{weights} is not a PyTorch checkpoint ({first})") from None
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedError(f"{weights} holds no state dict of tensors (an MMDetection checkpoint has one)")
    if not any(str(k).startswith("backbone.") for k in state):
        raise PretrainedError(f"{weights} is not a detector's state dict (no backbone weights)")


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
