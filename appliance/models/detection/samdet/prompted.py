"""sam-prompt: a detector whose proposals are SAM's own masks, scored by heads trained on SAM features.

For natural photos from tens of examples (few-shot, as PerSAM and Matcher): learning where a class is and which
of SAM's masks is an object of it is much easier than regressing boxes.

- ``heat``: a 1x1 conv on the 64x64 embedding, the chance that each 16-pixel cell lies on an object of each class
  (trained on the annotated masks' cover of each cell).
- Proposals: the heat map's peaks prompt SAM's mask decoder, three candidate masks each (whole, part, sub-part).
- ``scorer``: an MLP on each candidate's mask-pooled embedding, SAM's predicted IoU and stability, the heat inside
  and around it, and its size: per class, how good a mask of an object of that class it is (0 at IoU 0.5 or
  less, 1 from 0.9: what the annotator keeps scores highest).
  It trains on candidates prompted at a grid of points and at each object's interior point, decoded once per
  image and run (SAM is frozen).
- Overlapping candidates are suppressed by mask IoU; masks are SAM's, upsampled to the image's size.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from mmdet.models.detectors.base import BaseDetector
from mmdet.registry import MODELS
from mmengine.structures import InstanceData
from torch import nn

from appliance.models.detection.samdet.detector import SamBoxDecoder
from appliance.models.detection.samdet.sam_parts import EMBED_STRIDE

LOW_RES = 256  # SAM's decoder masks: 256x256 over the 1024x1024 input
GRID = 64  # embedding cells per side
EXTRA = 6  # predicted IoU, stability, heat inside, heat around, log area, candidate index
MATCH_IOU, FULL_IOU = 0.5, 0.9  # the scorer's target: 0 at a mask IoU of MATCH_IOU or less, 1 from FULL_IOU


@MODELS.register_module()
class SamPromptDetector(BaseDetector):
    frozen_prefixes = ("backbone.", "sam_decoder.")

    def __init__(self, backbone: dict, num_classes: int, sam: dict | None = None, hidden: int = 64,
                 train_grid: int = 5, test_cfg: dict | None = None, train_cfg=None, data_preprocessor=None,
                 init_cfg=None) -> None:
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.backbone = MODELS.build(backbone)
        self.sam_decoder = SamBoxDecoder(**(sam or {}))
        self.num_classes, self.train_grid = num_classes, train_grid
        self.heat = nn.Conv2d(256, num_classes, 1)
        self.scorer = nn.Sequential(nn.Linear(256 + EXTRA + 2 * num_classes, hidden), nn.ReLU(),
                                    nn.Dropout(0.2), nn.Linear(hidden, num_classes))
        self.norm = nn.LayerNorm(256, elementwise_affine=False)
        defaults = dict(peaks=32, peak_thr=0.1, score_thr=0.05, nms_iou=0.5, max_per_img=100)
        self.test_cfg = {**defaults, **(test_cfg or {})}
        self._train_candidates: dict[str, dict] = {}  # per image, for the run: SAM is frozen

    # --- mmdet's interface ----------------------------------------------------------------
    def extract_feat(self, batch_inputs: torch.Tensor) -> torch.Tensor:
        return self.backbone(batch_inputs)

    def _forward(self, batch_inputs: torch.Tensor, batch_data_samples=None):
        return self.heat(self.extract_feat(batch_inputs))

    def loss(self, batch_inputs: torch.Tensor, batch_data_samples: list) -> dict:
        embeddings = self.extract_feat(batch_inputs)
        heat_logits = self.heat(embeddings)
        heat_losses, score_losses = [], []
        for i, sample in enumerate(batch_data_samples):
            geometry = _Geometry(sample.metainfo)
            truth = _truth_low_res(sample.gt_instances, geometry)
            valid = geometry.valid_cells(heat_logits.device)
            # Soft: a small object's cell is partly on it, so the peaks find objects smaller than a cell.
            target = _cell_cover(truth, sample.gt_instances.labels, self.num_classes, geometry)
            heat_losses.append(_balanced_bce(heat_logits[i][:, valid].t(), target[:, valid].t()))
            candidates = self._candidates_for_training(embeddings[i:i + 1], sample, geometry)
            if candidates["masks"].shape[0] == 0:
                continue
            features = self._features(candidates, embeddings[i], torch.sigmoid(heat_logits[i]).detach(), geometry)
            labels = _labels(candidates["masks"], truth, sample.gt_instances.labels, self.num_classes)
            score_losses.append(_balanced_bce(self.scorer(features), labels))
        losses = {"loss_heat": torch.stack(heat_losses).mean()}
        losses["loss_score"] = torch.stack(score_losses).mean() if score_losses else heat_logits.sum() * 0
        return losses

    def predict(self, batch_inputs: torch.Tensor, batch_data_samples: list, rescale: bool = True) -> list:
        embeddings = self.extract_feat(batch_inputs)
        heat = torch.sigmoid(self.heat(embeddings))
        results = []
        for i, sample in enumerate(batch_data_samples):
            geometry = _Geometry(sample.metainfo)
            out_size = sample.metainfo["ori_shape"] if rescale else sample.metainfo["img_shape"]
            results.append(self._predict_one(embeddings[i:i + 1], heat[i], geometry, tuple(out_size)))
        return self.add_pred_to_datasample(batch_data_samples, results)

    # --- proposals --------------------------------------------------------------------------
    def _predict_one(self, embedding: torch.Tensor, heat: torch.Tensor, geometry: "_Geometry",
                     out_size: tuple[int, int]) -> InstanceData:
        cfg = self.test_cfg
        cells = heat.max(0).values * geometry.valid_cells(heat.device)
        points = _peaks(cells, int(cfg["peaks"]), float(cfg["peak_thr"]))
        candidates = self._decode(embedding, points)
        empty = InstanceData(bboxes=torch.zeros((0, 4)), scores=torch.zeros(0), labels=torch.zeros(0).long(),
                             masks=torch.zeros((0, *out_size), dtype=torch.bool))
        if candidates["masks"].shape[0] == 0:
            return empty
        probs = torch.sigmoid(self.scorer(self._features(candidates, embedding[0], heat, geometry)))
        scores, labels = probs.max(1)
        keep = torch.nonzero(scores >= float(cfg["score_thr"]))[:, 0]
        keep = keep[_mask_nms(candidates["masks"][keep], scores[keep], labels[keep], float(cfg["nms_iou"]))]
        keep = keep[: int(cfg["max_per_img"])]
        if keep.numel() == 0:
            return empty
        logits = candidates["logits"][keep][:, None, : geometry.crop[0], : geometry.crop[1]]
        masks = F.interpolate(logits, out_size, mode="bilinear", align_corners=False)[:, 0] > 0.0
        return InstanceData(bboxes=_boxes(masks), scores=scores[keep], labels=labels[keep], masks=masks)

    def _candidates_for_training(self, embedding: torch.Tensor, sample, geometry: "_Geometry") -> dict:
        """Candidates at a grid and at each object's interior point (an annotator's first click), decoded once
        per image and run: SAM is frozen."""
        key = str(sample.metainfo.get("img_path"))
        if key not in self._train_candidates:
            points = _grid(self.train_grid, geometry) + _interior_points(sample.gt_instances, geometry)
            found = self._decode(embedding, points)
            self._train_candidates[key] = {k: v for k, v in found.items() if k != "logits"}
        return self._train_candidates[key]

    def _decode(self, embedding: torch.Tensor, points: list[tuple[float, float]]) -> dict:
        """Three candidate masks per point (x, y in the encoder's input frame): low-res logits, bool masks,
        SAM's predicted IoU, stability; candidates SAM itself rates poorly are left out."""
        if not points:
            zeros = torch.zeros((0, LOW_RES, LOW_RES), device=embedding.device)
            return {"logits": zeros, "masks": zeros.bool(), "iou": zeros[:, 0, 0], "stability": zeros[:, 0, 0],
                    "index": zeros[:, 0, 0], **_cover(zeros.bool())}
        logits, iou = self.sam_decoder.points(embedding, torch.tensor(points, device=embedding.device))
        stability = (logits > 1).sum((1, 2)).float() / (logits > -1).sum((1, 2)).float().clamp(min=1)
        index = torch.arange(3, device=logits.device).repeat(len(points)).float()
        masks = logits > 0
        keep = (masks.sum((1, 2)) >= 4) & (iou >= 0.5)
        return {"logits": logits[keep], "masks": masks[keep], "iou": iou[keep], "stability": stability[keep],
                "index": index[keep], **_cover(masks[keep])}

    def _features(self, candidates: dict, embedding: torch.Tensor, heat: torch.Tensor,
                  geometry: "_Geometry") -> torch.Tensor:
        cover, area, around = candidates["cover"], candidates["area"], candidates["around"]
        pooled = self.norm(torch.einsum("nhw,chw->nc", cover, embedding) / area[:, None])
        heat_in = torch.einsum("nhw,chw->nc", cover, heat) / area[:, None]
        heat_around = torch.einsum("nhw,chw->nc", around, heat) / around.sum((1, 2)).clamp(min=1e-3)[:, None]
        extra = torch.stack([candidates["iou"], candidates["stability"], heat_in.max(1).values,
                             heat_around.max(1).values, torch.log(area / geometry.cells),
                             candidates["index"] / 2], 1)
        return torch.cat([pooled, extra, heat_in, heat_around], 1)


def _cover(masks: torch.Tensor) -> dict:
    """Where each candidate mask lies on the embedding's 64x64 cells (its share of each), its area in cells and the
    ring of cells around it: the scorer's pooling weights, computed once per candidate."""
    cover = F.adaptive_avg_pool2d(masks.float()[:, None], GRID)[:, 0]
    around = (F.max_pool2d(cover[:, None], 9, 1, 4)[:, 0] - cover).clamp(min=0)
    return {"cover": cover, "area": cover.sum((1, 2)).clamp(min=1e-3), "around": around}


class _Geometry:
    """Where the image lies in SAM's padded 1024 input, in the decoder's 256 and the embedding's 64 frames."""

    def __init__(self, meta: dict) -> None:
        self.input = tuple(int(v) for v in meta["img_shape"][:2])  # resized image inside the 1024 input
        self.crop = tuple(max(1, round(v * LOW_RES / 1024)) for v in self.input)
        self.cells = float(np.ceil(self.input[0] / EMBED_STRIDE) * np.ceil(self.input[1] / EMBED_STRIDE))

    def valid_cells(self, device) -> torch.Tensor:
        valid = torch.zeros((GRID, GRID), dtype=torch.bool, device=device)
        valid[: int(np.ceil(self.input[0] / EMBED_STRIDE)), : int(np.ceil(self.input[1] / EMBED_STRIDE))] = True
        return valid


def _truth_low_res(gt_instances, geometry: _Geometry) -> torch.Tensor:
    """The annotated masks (n x 256 x 256 bool) in the decoder's frame, from the image's own size."""
    device = gt_instances.labels.device
    if len(gt_instances) == 0:
        return torch.zeros((0, LOW_RES, LOW_RES), dtype=torch.bool, device=device)
    masks = torch.as_tensor(gt_instances.masks.to_ndarray(), dtype=torch.float32, device=device)
    small = F.interpolate(masks[:, None], geometry.crop, mode="area")[:, 0] >= 0.5
    return F.pad(small, (0, LOW_RES - geometry.crop[1], 0, LOW_RES - geometry.crop[0]))


def _cell_cover(truth: torch.Tensor, labels: torch.Tensor, num_classes: int, geometry: _Geometry) -> torch.Tensor:
    """C x 64 x 64: the share of each cell covered by objects of each class."""
    cover = torch.zeros((num_classes, LOW_RES, LOW_RES), device=truth.device)
    for mask, label in zip(truth, labels):
        cover[int(label)] = torch.maximum(cover[int(label)], mask.float())
    return F.avg_pool2d(cover[None], LOW_RES // GRID)[0]


def _labels(masks: torch.Tensor, truth: torch.Tensor, gt_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """n x C soft targets: 0 up to IoU 0.5 with an object of that class, rising to 1 at IoU 0.9. A mask good enough
    to keep scores above an almost-right one (coco-ccby person, N=20: 11 kept where the 0/1 target at 0.5 showed
    nothing at the cheapest threshold; segm AP 0.237 against 0.221)."""
    labels = torch.zeros((masks.shape[0], num_classes), device=masks.device)
    if truth.shape[0]:
        iou = _mask_iou(masks, truth)
        for j, label in enumerate(gt_labels):
            quality = ((iou[:, j] - MATCH_IOU) / (FULL_IOU - MATCH_IOU)).clamp(0, 1)
            labels[:, int(label)] = torch.maximum(labels[:, int(label)], quality)
    return labels


def _mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.flatten(1).float(), b.flatten(1).float()
    inter = a @ b.t()
    return inter / (a.sum(1)[:, None] + b.sum(1)[None] - inter).clamp(min=1)


def _balanced_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE with the positives weighted up to the negatives (at most 10x): objects are rare among cells and
    candidates."""
    positives = target.sum(0).clamp(min=1e-3)
    weight = ((target.shape[0] - positives) / positives).clamp(1, 10)
    return F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight)


def _peaks(cells: torch.Tensor, top: int, threshold: float, stride: float = EMBED_STRIDE) -> list[tuple[float, float]]:
    """Centres (x, y, input frame) of the ``top`` highest local maxima above ``threshold`` of a map whose cells
    are ``stride`` input pixels wide."""
    is_peak = (cells == F.max_pool2d(cells[None, None], 3, 1, 1)[0, 0]) & (cells > threshold)
    where = torch.nonzero(is_peak)
    order = torch.argsort(cells[is_peak], descending=True)[:top]
    return [((float(x) + 0.5) * stride, (float(y) + 0.5) * stride) for y, x in where[order].tolist()]


def _grid(n: int, geometry: _Geometry) -> list[tuple[float, float]]:
    height, width = geometry.input
    return [((i + 0.5) / n * width, (j + 0.5) / n * height) for j in range(n) for i in range(n)]


def _interior_points(gt_instances, geometry: _Geometry) -> list[tuple[float, float]]:
    """Each annotated object's most interior pixel, in the input frame (the click an annotator makes first)."""
    import cv2

    points = []
    masks = gt_instances.masks.to_ndarray() if len(gt_instances) else []
    for mask in masks:
        distance = cv2.distanceTransform(np.pad(mask.astype(np.uint8), 1), cv2.DIST_L2, 3)[1:-1, 1:-1]
        y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
        points.append(((x + 0.5) * geometry.input[1] / mask.shape[1], (y + 0.5) * geometry.input[0] / mask.shape[0]))
    return points


def _mask_nms(masks: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, threshold: float,
              inside: float = 0.8) -> torch.Tensor:
    """Indices kept, best first: a mask overlapping a better one of its class at IoU > threshold goes, and so does
    one lying mostly (``inside``) within it: a part of an object found (a shirt, a wheel) is not another object."""
    order = torch.argsort(scores, descending=True)
    flat = masks[order].flatten(1).float()
    inter = flat @ flat.t()
    area = flat.sum(1)
    iou = inter / (area[:, None] + area[None] - inter).clamp(min=1)
    within = inter / area[:, None].clamp(min=1)  # [i, j]: the share of mask i inside mask j
    same = labels[order][:, None] == labels[order][None]
    kept: list[int] = []
    for i in range(order.numel()):
        if not any(same[i, j] and (iou[i, j] > threshold or within[i, j] > inside) for j in kept):
            kept.append(i)
    return order[torch.tensor(kept, dtype=torch.long)]


def _boxes(masks: torch.Tensor) -> torch.Tensor:
    """x0, y0, x1, y1 of each bool mask (n x H x W)."""
    if masks.shape[0] == 0:
        return torch.zeros((0, 4))
    rows, cols = masks.any(2), masks.any(1)

    def span(present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.arange(present.shape[1], device=present.device)
        first = torch.where(present, index, present.shape[1]).min(1).values
        last = torch.where(present, index, -1).max(1).values + 1
        return first, last

    y0, y1 = span(rows)
    x0, x1 = span(cols)
    return torch.stack([x0, y0, x1, y1], 1).float()
