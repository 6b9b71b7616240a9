"""What the annotator pays for a photo, with a model's pre-annotations and without: the measure the loop optimises.

The cost model (the same in the trainer's gate and in benchmarks/project_sim.py):

- a predicted mask that matches an object of its label at IoU >= KEEP_IOU is **kept**: 0 actions (one prediction per
  object: a second one on the same object is a duplicate);
- every other prediction is **deleted**: 1 action each (a wrong object, a wrong label, or an almost-right mask);
- every object no kept prediction covers costs its **SAM clicks** (the simulated annotator of
  appliance.models.sam.annotator, at most MAX_CLICKS); when its first click lands on a shown prediction of its label
  (the best-scored one there), the SAM backend refines that prediction (its box is the first prompt), so the object
  costs the clicks from there (``Photo.seeds``) and the prediction is still deleted;
- the **submit**: 1 action per photo.

With SAM clicks alone a photo costs the clicks of all its objects plus the submit. A score threshold per class
decides which predictions are shown; ``choose_thresholds`` picks, per class, the one that costs least.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from appliance.models.sam.annotator import KEEP_IOU

NO_PREDICTIONS = 1.01  # a threshold above every score: the class is not pre-annotated at all


@dataclass(frozen=True)
class Predicted:
    label: str
    score: float
    mask: np.ndarray  # bool HxW


@dataclass(frozen=True)
class Truth:
    label: str
    mask: np.ndarray  # bool HxW
    clicks: int  # what SAM alone needs for this object


@dataclass
class Cost:
    photos: int = 0
    objects: int = 0
    kept: int = 0
    deleted: int = 0
    clicks: int = 0
    sam_only: int = 0  # the actions of the same photos with SAM clicks alone
    predictions: int = 0

    @property
    def actions(self) -> int:
        return self.deleted + self.clicks + self.photos

    def add(self, other: "Cost") -> "Cost":
        for name in ("photos", "objects", "kept", "deleted", "clicks", "sam_only", "predictions"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def as_dict(self) -> dict:
        return {"photos": self.photos, "objects": self.objects, "kept": self.kept, "deleted": self.deleted,
                "clicks": self.clicks, "actions": self.actions, "sam_only": self.sam_only,
                "predictions": self.predictions, "saved": saved_fraction(self.actions, self.sam_only)}


def saved_fraction(actions: int, sam_only: int) -> float:
    """The share of the SAM-only actions the pre-annotations save (negative: they cost more)."""
    return round(1 - actions / sam_only, 4) if sam_only else 0.0


@dataclass
class Photo:
    """One held-out photo: its objects (with SAM's clicks for each) and a model's predictions (any score)."""

    truths: list[Truth]
    predicted: list[Predicted] = field(default_factory=list)
    _ious: np.ndarray | None = field(default=None, repr=False)
    # {object index: (prediction index, clicks)}: the best-scored prediction under the object's first click, and
    # SAM's clicks when the object is refined from it.
    seeds: dict[int, tuple[int, int]] = field(default_factory=dict)

    def ious(self) -> np.ndarray:
        """IoU of every prediction (rows) with every object (columns), computed once."""
        if self._ious is None:
            self._ious = _iou_matrix([p.mask for p in self.predicted], [t.mask for t in self.truths])
        return self._ious


def photo_cost(photo: Photo, thresholds: dict[str, float] | None = None, default: float = 0.0) -> Cost:
    """The annotator's cost of one photo when the predictions at or above their class's threshold are shown."""
    thresholds = thresholds or {}
    shown = [i for i, p in enumerate(photo.predicted) if p.score >= thresholds.get(p.label, default)]
    kept = match(photo, shown)
    visible = set(shown)
    clicks = sum(_clicks(photo, j, visible) for j in range(len(photo.truths)) if j not in kept.values())
    return Cost(photos=1, objects=len(photo.truths), kept=len(kept), deleted=len(shown) - len(kept),
                clicks=clicks, sam_only=sum(t.clicks for t in photo.truths) + 1, predictions=len(shown))


def _clicks(photo: Photo, j: int, shown: set[int]) -> int:
    """Object ``j``'s clicks: from its seed when that prediction is shown, else SAM's from nothing."""
    seed = photo.seeds.get(j)
    return seed[1] if seed is not None and seed[0] in shown else photo.truths[j].clicks


def match(photo: Photo, shown: list[int] | None = None, keep_iou: float = KEEP_IOU) -> dict[int, int]:
    """{prediction index: object index} of the kept predictions among ``shown`` (all by default): greedily by
    score, one prediction per object, same label, IoU >= keep_iou."""
    shown = list(range(len(photo.predicted))) if shown is None else shown
    ious = photo.ious()
    kept: dict[int, int] = {}
    taken: set[int] = set()
    for i in sorted(shown, key=lambda k: -photo.predicted[k].score):
        best, best_iou = None, keep_iou
        for j, truth in enumerate(photo.truths):
            if j not in taken and truth.label == photo.predicted[i].label and ious[i, j] >= best_iou:
                best, best_iou = j, ious[i, j]
        if best is not None:
            kept[i] = best
            taken.add(best)
    return kept


def total(photos: list[Photo], thresholds: dict[str, float] | None = None, default: float = 0.0) -> Cost:
    cost = Cost()
    for photo in photos:
        cost.add(photo_cost(photo, thresholds, default))
    return cost


def choose_thresholds(photos: list[Photo], floor: float | None = None) -> dict[str, float]:
    """Per predicted class, the score threshold that costs the annotator least on ``photos`` (classes do not
    interact: a prediction is kept only by an object of its own label). Ties go to the higher threshold (fewer
    predictions shown); NO_PREDICTIONS when showing none of the class is cheapest. When showing every prediction
    is cheapest and ``floor`` is the lowest score the photos were predicted at, the threshold is halfway down to
    it: a good prediction on a served photo scored a little below the held-out ones is shown too."""
    labels = sorted({p.label for photo in photos for p in photo.predicted})
    chosen = {}
    for label in labels:
        only = [_only(photo, label) for photo in photos]
        # Greedy matching goes by score, so the predictions shown at a threshold match as they do among all of
        # them, and an object's seed (the best-scored prediction under its first click) is shown from its score
        # down: lowering the threshold past a prediction changes only its own cost (a deletion, or its object's
        # clicks saved) and the clicks of the objects it seeds. One pass per class, in score order.
        steps = sorted(((p.score, n, i) for n, photo in enumerate(only) for i, p in enumerate(photo.predicted)),
                       key=lambda step: -step[0])
        keepers = [match(photo) for photo in only]
        seeding = [_seeding(photo) for photo in only]
        clicks = [[t.clicks for t in photo.truths] for photo in only]  # each object's clicks as shown so far
        kept: set[tuple[int, int]] = set()
        scores = sorted({score for score, _, _ in steps}, reverse=True)
        actions = best_actions = total(only, {label: NO_PREDICTIONS}).actions
        best, added = len(scores), 0
        for k, score in enumerate(scores):
            while added < len(steps) and steps[added][0] >= score:
                _, n, i = steps[added]
                if i in keepers[n]:
                    j = keepers[n][i]
                    actions -= clicks[n][j]
                    kept.add((n, j))
                else:
                    actions += 1
                for j, from_seed in seeding[n].get(i, []):
                    if (n, j) not in kept:
                        actions += from_seed - clicks[n][j]
                        clicks[n][j] = from_seed
                added += 1
            if actions < best_actions:
                best, best_actions = k, actions
        # Halfway to the next lower score: a prediction scored a hair below the cheapest one is treated alike.
        lower = scores[best + 1] if best + 1 < len(scores) else floor
        chosen[label] = (NO_PREDICTIONS if best == len(scores) else
                         scores[best] if lower is None else round((scores[best] + lower) / 2, 6))
    return chosen


SURE_Z = 1.0  # the saving on unseen photos counts when it exceeds one standard error of its sum


def unseen(photos: list[Photo], floor: float | None = None) -> dict:
    """What the threshold rule saves on photos it did not see: each photo costed at the thresholds chosen on the
    others (leave one out), and ``lower``, that saving less one standard error of it (per-photo savings vary).

    The thresholds served are chosen on all the held-out photos, so their saving measured on the same photos is
    optimistic: on the coco-ccby people, a model that saved actions so measured cost more than SAM alone on the
    other photos in 34-42 of 100 random splits (benchmarks/threshold_splits.py). A version serves only when
    ``lower`` > 0. One photo alone cannot be checked: chosen on no photo, nothing is shown, and it saves 0."""
    saved = []
    for k, photo in enumerate(photos):
        spent = photo_cost(photo, choose_thresholds(photos[:k] + photos[k + 1:], floor), NO_PREDICTIONS)
        saved.append(spent.sam_only - spent.actions)
    spread = float(np.std(saved, ddof=1) * np.sqrt(len(saved))) if len(saved) > 1 else 0.0
    return {"photos": len(saved), "saved": int(sum(saved)), "lower": round(sum(saved) - SURE_Z * spread, 2)}


def _only(photo: Photo, label: str) -> Photo:
    keep = [i for i, p in enumerate(photo.predicted) if p.label == label]
    objects = [j for j, t in enumerate(photo.truths) if t.label == label]
    seeds = {objects.index(j): (keep.index(i), clicks) for j, (i, clicks) in photo.seeds.items()
             if j in objects and i in keep}
    return Photo([photo.truths[j] for j in objects], [photo.predicted[i] for i in keep],
                 photo.ious()[np.ix_(keep, objects)], seeds)


def _seeding(photo: Photo) -> dict[int, list[tuple[int, int]]]:
    """{prediction index: [(object index, clicks from it)]}: the objects each prediction seeds."""
    out: dict[int, list[tuple[int, int]]] = {}
    for j, (i, clicks) in photo.seeds.items():
        out.setdefault(i, []).append((j, clicks))
    return out


def _iou_matrix(predicted: list[np.ndarray], truths: list[np.ndarray]) -> np.ndarray:
    from pycocotools import mask as mask_utils

    if not predicted or not truths:
        return np.zeros((len(predicted), len(truths)))
    encode = lambda masks: [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks]  # noqa: E731
    return np.asarray(mask_utils.iou(encode(predicted), encode(truths), [0] * len(truths)), dtype=float)


def saving(metrics: dict | None) -> str | None:
    """'saves 38 % of the actions on 12 held-out photos (…)', from a version's metrics; None when not measured."""
    spent = (metrics or {}).get("cost")
    if not spent or not spent.get("sam_only"):
        return None
    share = round(100 * (1 - spent["actions"] / spent["sam_only"]))
    verb = f"saves {share} %" if share >= 0 else f"costs {-share} % more"
    return (f"{verb} of the actions on {spent['photos']} held-out photo(s) ({spent['actions']} instead of "
            f"{spent['sam_only']} with SAM clicks alone: {spent['kept']} of {spent['objects']} objects kept, "
            f"{spent['deleted']} deleted)")
