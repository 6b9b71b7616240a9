"""One polygon per object, the only shape YOLO-seg has, with holes and separate parts kept.

An object's mask becomes its rings (cv2.findContours, RETR_CCOMP: every outer boundary and every hole, vertices on
boundary pixels) chained into one polygon by zero-width bridges: from a point of the polygon so far to the nearest
point of the next ring, around that ring, and back (Ultralytics joins multi-part COCO objects the same way).
Filled with the even-odd rule (cv2.fillPoly, which Ultralytics uses to rasterise), a hole ring crossed twice stays
empty, so holes survive. What is lost: the bridges draw one-pixel lines where they cross background or holes,
and pixel-exact edges become vertices on boundary pixels; tests/test_export.py measures the IoU on real masks.
"""

from __future__ import annotations

import cv2
import numpy as np


def rings(mask: np.ndarray) -> list[np.ndarray]:
    """Outer boundaries and holes of ``mask`` as (N, 2) int arrays of x, y; the largest outer ring first."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    found = [c.reshape(-1, 2) for c in contours if len(c) >= 1]
    found.sort(key=lambda c: -abs(cv2.contourArea(c.reshape(-1, 1, 2))) if len(c) >= 3 else 0)
    return found


def bridge(base: np.ndarray, ring: np.ndarray) -> np.ndarray:
    """``base`` with ``ring`` spliced in at their nearest points: ..., b, r_k, ..., r_(k-1), r_k, b, ..."""
    distance = ((base[:, None, :].astype(np.int64) - ring[None, :, :]) ** 2).sum(axis=2)
    i, k = np.unravel_index(int(distance.argmin()), distance.shape)
    around = np.concatenate([ring[k:], ring[:k + 1]])
    return np.concatenate([base[:i + 1], around, base[i:]])


def mask_polygon(mask: np.ndarray) -> np.ndarray | None:
    """The object's single polygon, (N, 2) pixel x, y; None for an empty mask."""
    found = rings(mask)
    if not found:
        return None
    polygon = found[0]
    for ring in found[1:]:
        polygon = bridge(polygon, ring)
    if len(polygon) < 3:  # a one-pixel-wide line or a single pixel: readers want 3 points; the fill draws it
        polygon = np.concatenate([polygon, polygon[-1:].repeat(3 - len(polygon), axis=0)])
    return polygon


def rasterise(polygon: np.ndarray, width: int, height: int) -> np.ndarray:
    """The mask a YOLO-seg reader draws from ``polygon`` (even-odd fill)."""
    out = np.zeros((height, width), dtype=np.uint8)
    cv2.fillPoly(out, [np.round(polygon).astype(np.int32).reshape(-1, 1, 2)], 1)
    return out.astype(bool)
