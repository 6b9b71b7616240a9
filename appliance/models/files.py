"""Checks shared by the model code that reads a weights file the user named."""

from __future__ import annotations

from pathlib import Path


def weights_file(path, error: type[Exception]) -> Path:
    """``path`` as an existing, non-empty file; ``error`` naming what is wrong otherwise."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise error(f"no file at {path}")
    if path.stat().st_size == 0:
        raise error(f"{path} is empty")
    return path
