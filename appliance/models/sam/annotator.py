"""The simulated annotator of interactive-segmentation benchmarks, and SAM's clicks for an object with it.

The standard protocol: the first click at the object's most interior point (the maximum of the distance transform of
its true mask), each next click at the most interior point of the largest error region (positive where the mask
missed the object, negative where it added to it), until the mask reaches the goal IoU or the clicks run out.
Used by the benchmarks (through Label Studio, or in-process) and by the trainer's cost model (in-process, on the
held-out tasks), so both count the same clicks.
"""

from __future__ import annotations

from typing import Callable, Sequence

import cv2
import numpy as np

from .seeds import Seed, mask_box

Click = tuple[tuple[int, int], bool]  # ((x, y), positive)
Segment = Callable[[Sequence[Click]], np.ndarray]  # all the object's clicks so far -> its mask

KEEP_IOU = 0.85  # an object is done (or a pre-annotated mask kept as is) at this IoU with the truth
MAX_CLICKS = 20  # an annotator gives up clicking (and would paint) after this many


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def interior(region: np.ndarray) -> tuple[tuple[int, int], float]:
    """The point of ``region`` farthest from its border, and that distance."""
    padded = np.pad(region.astype(np.uint8), 1)
    distance = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return (int(x), int(y)), float(distance[y, x])


def next_click(truth: np.ndarray, predicted: np.ndarray) -> Click:
    """The centre of the larger error: missed (positive click) or added (negative click)."""
    missed, missed_depth = interior(truth & ~predicted)
    added, added_depth = interior(predicted & ~truth)
    return (missed, True) if missed_depth >= added_depth else (added, False)


def click_ious(segment: Segment, truth: np.ndarray, max_clicks: int, stop_at: float = 0.99) -> list[float]:
    """IoU after each click (padded with the last one up to ``max_clicks`` once ``stop_at`` is reached)."""
    clicks: list[Click] = [(interior(truth)[0], True)]
    ious: list[float] = []
    while True:
        mask = segment(clicks)
        ious.append(iou(mask, truth))
        if len(clicks) == max_clicks or ious[-1] >= stop_at:
            return ious + [ious[-1]] * (max_clicks - len(ious))
        clicks.append(next_click(truth, mask))


def clicks_to_reach(segment: Segment, truth: np.ndarray, goal: float = KEEP_IOU, max_clicks: int = MAX_CLICKS) -> int:
    """The clicks the annotator spends on ``truth``: until IoU >= goal, ``max_clicks`` when it is never reached."""
    ious = click_ious(segment, truth, max_clicks, stop_at=goal)
    return next((i + 1 for i, value in enumerate(ious) if value >= goal), max_clicks)


class EngineClicks:
    """SAM's own click protocol on one image embedding: the first click picks the best of SAM's three masks, each
    next one decodes all the clicks with the previous mask's logits as ``mask_input`` (as SamPredictor is used).
    With a ``seed`` (the prediction under the first click) the object is refined from it as the SAM backend does
    (seeds.py): every decode has its box, when SAM agrees the click is on it."""

    def __init__(self, engine, embedding) -> None:
        self.engine, self.embedding = engine, embedding
        self._logits = None
        self._box = None

    def segment(self, clicks: Sequence[Click]) -> np.ndarray:
        mask_input = None if len(clicks) == 1 else self._logits
        decoded = self.engine.decode(self.embedding, [p for p, _ in clicks], [int(pos) for _, pos in clicks],
                                     box=self._box, mask_input=mask_input)
        self._logits = decoded.logits
        return decoded.mask

    def clicks(self, truth: np.ndarray, goal: float = KEEP_IOU, max_clicks: int = MAX_CLICKS,
               seed: np.ndarray | None = None) -> int:
        if not truth.any():
            return 0
        self._box = None
        if seed is not None:
            alone = self.engine.decode(self.embedding, [interior(truth)[0]], [1]).mask
            if Seed(seed, 1.0).confirmed_by(alone):
                self._box = mask_box(seed)
        return clicks_to_reach(self.segment, truth, goal, max_clicks)
