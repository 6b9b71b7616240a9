"""Converting masks to Label Studio's result formats (brush RLE, polygon points in percent)."""

from __future__ import annotations

import cv2
import numpy as np
from label_studio_sdk.converter.brush import decode_rle, mask2rle


def mask_to_brush_rle(mask: np.ndarray) -> list[int]:
    """Label Studio brush RLE of a 2-D mask (any nonzero pixel is inside).

    Label Studio's RLE encodes the flattened HxWx4 RGBA image; the mask goes into every channel as 0/255.
    """
    _check_2d(mask)
    return mask2rle(np.where(mask != 0, 255, 0).astype(np.uint8))


def brush_rle_to_mask(rle: list[int], height: int, width: int) -> np.ndarray:
    """Decode a Label Studio brush RLE to a bool HxW mask (alpha channel at least half opaque)."""
    flat = decode_rle(rle)
    if flat.size != height * width * 4:
        raise ValueError(f"brush RLE holds {flat.size} values, expected {height}x{width}x4 = {height * width * 4}")
    return flat.reshape(height, width, 4)[:, :, 3] >= 128


def mask_to_polygons(mask: np.ndarray, tolerance: float = 1.0, min_area: float = 0.0) -> list[list[list[float]]]:
    """Outer contours of ``mask`` simplified by Douglas-Peucker (``tolerance`` in pixels), largest first.

    Each polygon is a list of [x%, y%] points in percent of the image width/height, Label Studio's convention.
    Vertices are the integer pixel positions of boundary pixels, so rasterising them back with
    ``cv2.fillPoly`` reproduces the mask up to the simplification.
    """
    _check_2d(mask)
    height, width = mask.shape
    contours, _ = cv2.findContours((mask != 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    shapes = []
    for contour in contours:
        approx = cv2.approxPolyDP(contour, tolerance, True).reshape(-1, 2)
        area = cv2.contourArea(contour)
        if len(approx) >= 3 and area >= min_area:
            shapes.append((area, approx))
    shapes.sort(key=lambda item: item[0], reverse=True)
    return [[[float(x) * 100.0 / width, float(y) * 100.0 / height] for x, y in approx] for _, approx in shapes]


def _check_2d(mask: np.ndarray) -> None:
    if not isinstance(mask, np.ndarray) or mask.ndim != 2 or 0 in mask.shape:
        raise ValueError(f"expected a non-empty 2-D mask, got shape {getattr(mask, 'shape', None)}")
