"""The objects an annotator's clicks describe, each decoded with its previous mask (SAM's ``mask_input``).

The clicks of one label arrive together and in order (Label Studio sends every pending smart keypoint of the label
on each click). They are split into objects, one mask each:

- a box starts a new object;
- a positive click on or near an object's mask (within ``near_px``) refines that object (the newest such object);
- a positive click elsewhere refines an object when what SAM segments at that point alone touches the object's mask
  (a missed part of it), or when it lies within the newest object's reach: the union of SAM's three candidate masks
  for that object's first click (part, larger part, whole: where the object may extend), or its box when a box
  started it. The annotator's next click on a half-found object lands in its missed part, which SAM's first mask
  may not touch (a person's legs below a coat); such a click refines it instead of leaving it stuck;
- a positive click beyond all that refines the newest object when, decoded as that object's next click, it grows
  the object into one blob that keeps its mask (a couch's far arm); a second object comes back as a blob of its own;
- otherwise the click starts a new object: a second object away from the first is never glued to it. Objects that
  touch or lie within each other's reach are told apart explicitly: accept the pending masks (Label Studio then
  drops its pending keypoints, so the next click starts afresh) or draw a box;
- a negative click refines the newest object whose mask holds it, else the newest object;
- an object whose mask became empty (negative clicks) takes the next click;
- a positive click that starts an object on a pre-annotated mask of its label starts from it when SAM agrees
  (``seeds.py``): the prediction's box is the object's first prompt.

Each object's decode after its first click feeds the object's previous low-resolution logits as ``mask_input``,
as the bare SamPredictor does. Decodes are remembered by image and click sequence (bounded by bytes), so a click
costs one decode however many objects are pending; a miss (another worker process) recomputes the same result.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import cv2
import numpy as np

from .cache import EmbeddingCache
from .engine import Box, Decoded, Embedding, Point, PromptError, SamEngine
from .seeds import Seed, seed_at

NEAR_FRACTION = 0.01  # "near a mask": within 1% of the image's longer side
GROW_KEEPS, GROW_AT_MOST = 0.8, 4.0  # a click beyond reach grows an object keeping 80% of it, at most 4x its area


@dataclass(frozen=True)
class Click:
    """One prompt in pixels of the original image: a point (positive or negative) or a box."""

    point: Point | None = None
    positive: bool = True
    box: Box | None = None

    def key(self) -> str:
        if self.box is not None:
            return "b" + ",".join(f"{v:.1f}" for v in self.box)
        return ("p" if self.positive else "n") + ",".join(f"{v:.1f}" for v in self.point)


@dataclass(frozen=True, eq=False)
class Remembered:
    """A decode kept between requests: the mask bit-packed, so a 12-megapixel image costs 1.5 MB."""

    packed: np.ndarray
    shape: tuple[int, int]
    score: float
    logits: object  # torch.Tensor, 1 x 1 x 256 x 256
    nbytes: int
    packed_reach: np.ndarray | None = None

    @classmethod
    def of(cls, decoded: Decoded) -> Remembered:
        packed = np.packbits(decoded.mask)
        reach = None if decoded.reach is None else np.packbits(decoded.reach)
        return cls(packed, decoded.mask.shape, decoded.score, decoded.logits,
                   packed.nbytes + (0 if reach is None else reach.nbytes)
                   + decoded.logits.element_size() * decoded.logits.nelement(), reach)

    def mask(self) -> np.ndarray:
        return _unpack(self.packed, self.shape)


@dataclass
class SegmentedObject:
    clicks: tuple[Click, ...]
    mask: np.ndarray
    score: float
    logits: object
    packed_reach: np.ndarray | None = None  # where it may extend (its first click's candidates, packed); None: box

    def within_reach(self, point: Point, near: int) -> bool:
        box = self.clicks[0].box
        if box is not None:
            return box[0] - near <= point[0] <= box[2] + near and box[1] - near <= point[1] <= box[3] + near
        return self.packed_reach is not None and _near_packed(self.packed_reach, self.mask.shape, point, near)


class ObjectSegmenter:
    def __init__(self, engine: SamEngine, memory: EmbeddingCache) -> None:
        self.engine = engine
        self.memory = memory

    def segment(self, embedding: Embedding, image_key: str, clicks: list[Click],
                seeds: list[Seed] = ()) -> list[SegmentedObject]:
        """The objects ``clicks`` describe, in the order their first click came; a new object clicked on one of
        ``seeds`` (pre-annotated masks of the label) starts from it."""
        if not clicks:
            raise PromptError("no prompt: give at least one point or a box")
        objects: list[SegmentedObject] = []
        near = max(2, round(NEAR_FRACTION * max(embedding.original_size)))
        for click in clicks:
            target = self._target(embedding, image_key, objects, click, near)
            if target is None:
                if not click.positive:
                    raise PromptError("only negative points: add a positive point or a box")
                objects.append(self._start(embedding, image_key, click, seeds))
            else:
                index = objects.index(target)
                refined = self._decode(embedding, image_key, target.clicks + (click,), target)
                refined.packed_reach = target.packed_reach
                objects[index] = refined
        return objects

    def _start(self, embedding: Embedding, image_key: str, click: Click, seeds) -> SegmentedObject:
        """A new object at a positive click: from the prediction under it when SAM agrees (seeds.py)."""
        alone = self._decode(embedding, image_key, (click,), None)
        seed = seed_at(seeds, click.point) if click.box is None else None
        if seed is None or not seed.confirmed_by(alone.mask):
            return alone
        return self._decode(embedding, image_key, (Click(box=seed.box), click), None)

    def _target(self, embedding: Embedding, image_key: str, objects: list[SegmentedObject], click: Click,
                near: int) -> SegmentedObject | None:
        if click.box is not None or not objects:
            return None
        for obj in reversed(objects):
            if _near(obj.mask, click.point, near) or not obj.mask.any():  # an emptied object takes the next click
                return obj
        if not click.positive:
            return objects[-1]
        alone = self._decode(embedding, image_key, (click,), None)  # remembered: it is the new object if it is one
        for obj in reversed(objects):
            if _touches(alone.mask, obj.mask, near):
                return obj
        newest = objects[-1]
        if newest.within_reach(click.point, near) or self._grows(embedding, image_key, newest, click):
            return newest
        return None

    def _grows(self, embedding: Embedding, image_key: str, obj: SegmentedObject, click: Click) -> bool:
        """Whether the click, decoded as ``obj``'s next one, grows it into one blob reaching the click that keeps most
        of its mask: a missed part beyond its reach (a person's far arm). A second object comes back as a blob of its
        own, or swallows the first. The decode is remembered, so refining costs nothing more."""
        refined = self._decode(embedding, image_key, obj.clicks + (click,), obj).mask
        old = obj.mask.sum()
        if not old or (refined & obj.mask).sum() < GROW_KEEPS * old or refined.sum() > GROW_AT_MOST * old:
            return False
        _, blobs = cv2.connectedComponents(refined.astype(np.uint8), connectivity=8)
        x, y = int(round(click.point[0])), int(round(click.point[1]))
        if not (0 <= y < blobs.shape[0] and 0 <= x < blobs.shape[1]) or blobs[y, x] == 0:
            return False
        return bool((obj.mask & (blobs == blobs[y, x])).sum() >= GROW_KEEPS * old)

    def _decode(self, embedding: Embedding, image_key: str, clicks: tuple[Click, ...],
                previous: SegmentedObject | None) -> SegmentedObject:
        key = image_key + ":" + hashlib.blake2b("|".join(c.key() for c in clicks).encode(), digest_size=16).hexdigest()

        def compute() -> Remembered:
            points = [c.point for c in clicks if c.point is not None]
            labels = [1 if c.positive else 0 for c in clicks if c.point is not None]
            boxes = [c.box for c in clicks if c.box is not None]
            mask_input = previous.logits if previous is not None else None
            return Remembered.of(self.engine.decode(embedding, points, labels, boxes[-1] if boxes else None,
                                                    mask_input, reach=True))

        remembered = self.memory.get_or_compute(key, compute)
        return SegmentedObject(clicks, remembered.mask(), remembered.score, remembered.logits, remembered.packed_reach)


def _unpack(packed: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return np.unpackbits(packed, count=shape[0] * shape[1]).reshape(shape).astype(bool)


def _near(mask: np.ndarray, point: Point, radius: int) -> bool:
    height, width = mask.shape
    x, y = int(round(point[0])), int(round(point[1]))
    # clamped both ways: a negative stop would wrap around to the far side of the mask
    window = mask[max(0, y - radius):max(0, min(height, y + radius + 1)),
                  max(0, x - radius):max(0, min(width, x + radius + 1))]
    return bool(window.any())


def _near_packed(packed: np.ndarray, shape: tuple[int, int], point: Point, radius: int) -> bool:
    """``_near`` on a bit-packed mask, unpacking only the rows around ``point``."""
    height, width = shape
    y = int(round(point[1]))
    y0, y1 = max(0, y - radius), min(height, y + radius + 1)
    if y1 <= y0:
        return False
    start, stop = y0 * width, y1 * width
    bits = np.unpackbits(packed[start // 8:(stop + 7) // 8])[start % 8:start % 8 + stop - start]
    return _near(bits.reshape(y1 - y0, width).astype(bool), (point[0], y - y0), radius)


def _touches(mask: np.ndarray, other: np.ndarray, radius: int) -> bool:
    """Whether ``mask`` grown by ``radius`` overlaps ``other`` (worked on ``mask``'s bounding box only)."""
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return False
    y0, y1 = max(0, ys.min() - radius), min(mask.shape[0], ys.max() + radius + 1)
    x0, x1 = max(0, xs.min() - radius), min(mask.shape[1], xs.max() + radius + 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    grown = cv2.dilate(mask[y0:y1, x0:x1].astype(np.uint8), kernel).astype(bool)
    return bool(np.logical_and(grown, other[y0:y1, x0:x1]).any())
