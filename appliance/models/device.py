"""Where a model runs: the one reading of APPLIANCE_DEVICE's "auto"."""

from __future__ import annotations


def resolve_device(device: str) -> str:
    """"cuda" or "cpu": ``auto`` picks the GPU when torch sees one; anything else is kept as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
