"""Pre-annotated masks a click refines (the SAM backend) and the simulated annotator's cost of it (the trainer).

Label Studio sends the task's predictions with each interactive request. A positive click that starts an object
on a prediction's mask of its label (the best-scored one there) starts from that prediction: its box is the
object's first prompt, so an almost-right mask is refined, not redone. Only when SAM agrees the click is on that
object: the click's own mask lies mostly inside the prediction's (a click on a wrong or merged prediction, or on
one the annotator already deleted, that lands on another object stays an ordinary click).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INSIDE = 0.8  # the share of the click's own mask inside the prediction's for the click to refine it

Box = tuple[float, float, float, float]


def mask_box(mask: np.ndarray) -> Box:
    """x0, y0, x1, y1 (pixel edges) of a non-empty bool mask."""
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


@dataclass(frozen=True, eq=False)
class Seed:
    """A pre-annotated mask (bool, in the clicks' frame) and its score."""

    mask: np.ndarray
    score: float

    @property
    def box(self) -> Box:
        return mask_box(self.mask)

    def holds(self, point: tuple[float, float]) -> bool:
        height, width = self.mask.shape
        x, y = min(width - 1, max(0, int(point[0]))), min(height - 1, max(0, int(point[1])))
        return bool(self.mask[y, x])

    def confirmed_by(self, clicked: np.ndarray) -> bool:
        """Whether SAM's mask of the click alone lies mostly inside this prediction."""
        area = int(clicked.sum())
        return area > 0 and int((clicked & self.mask).sum()) >= INSIDE * area


def seed_at(seeds, point: tuple[float, float]) -> Seed | None:
    """The best-scored seed holding ``point`` (None when none does)."""
    holding = [seed for seed in seeds if seed.mask.any() and seed.holds(point)]
    return max(holding, key=lambda seed: seed.score) if holding else None
