"""Sample photos for the offline demo: real photographs bundled with scikit-image, copied into an empty images
folder."""

from __future__ import annotations

import shutil
from importlib.resources import files
from pathlib import Path

SAMPLES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def has_images(folder: Path) -> bool:
    return folder.exists() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.rglob("*") if p.is_file())


def copy_samples(folder: Path) -> list[str]:
    """Copy the bundled photos into ``folder`` when it holds no image yet. Returns the names copied."""
    if has_images(folder):
        return []
    folder.mkdir(parents=True, exist_ok=True)
    source = files("skimage") / "data"
    for name in SAMPLES:
        with (source / name).open("rb") as src, open(folder / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return list(SAMPLES)
