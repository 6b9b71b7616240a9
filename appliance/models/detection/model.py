"""Inference with a trained model from a registry version directory."""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from appliance import compat
from appliance.models.device import resolve_device


class ModelLoadError(RuntimeError):
    """A version directory that cannot be turned into a working model."""


@dataclass
class Detection:
    label: str
    score: float
    bbox: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
    mask: np.ndarray | None                 # bool HxW, or None for box-only models


class Detector:
    """A model loaded from a dir holding config.py, weights.pth and classes.json."""

    def __init__(self, model_dir: Path, device: str = "auto", score_threshold: float = 0.3,
                 batch_size: int = 8, embedding_store: Path | None = None, embedding_store_mb: int = 2048,
                 class_thresholds: dict[str, float] | None = None) -> None:
        """embedding_store: the shared SAM embedding folder (sam-det models read image embeddings there and store
        the ones they compute); other models ignore it. class_thresholds: a score threshold per class (the ones
        the trainer chose for this version), score_threshold for the classes not listed."""
        compat.install()
        self.model_dir = Path(model_dir)
        self.device = resolve_device(device)
        self.score_threshold = score_threshold
        self.class_thresholds = dict(class_thresholds or {})
        self.batch_size = batch_size
        self.classes = _read_classes(self.model_dir / "classes.json")
        self.cfg = _read_config(self.model_dir / "config.py")
        self._model = _build_model(self.cfg, self.model_dir / "weights.pth", self.device)
        self._model.dataset_meta = {"classes": tuple(self.classes)}
        self._pipeline = _build_pipeline(self.cfg, embedding_store, embedding_store_mb)
        self._lock = threading.Lock()

    def predict(self, image: np.ndarray, score_threshold: float | None = None,
                key: str | None = None) -> list[Detection]:
        """Detections in one RGB uint8 HxWx3 image (key: the content key of its file, see predict_batch)."""
        return self.predict_batch([image], score_threshold, [key])[0]

    def predict_batch(self, images: Sequence[np.ndarray], score_threshold: float | None = None,
                      keys: Sequence[str | None] | None = None) -> list[list[Detection]]:
        """Detections per image; images go through the model batch_size at a time.

        keys: each image's content key (appliance.models.sam.cache.content_key of its file's bytes), under which
        a sam-det model finds the image's SAM embedding in the shared store instead of encoding the image.
        """
        explicit = score_threshold is not None  # one threshold for every class (evaluation)
        threshold = score_threshold if explicit else self.score_threshold
        by_class = {} if explicit else self.class_thresholds
        # The lowest threshold any class is served at: what the model decodes (a class set above 1 needs none).
        low = min(by_class.get(name, threshold) for name in self.classes) if self.classes else threshold
        keys = list(keys) if keys is not None else [None] * len(images)
        results: list[list[Detection]] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            batch = self._prepare(chunk, keys[start:start + self.batch_size])
            with self._lock:
                _set_score_threshold(self._model, low)
                samples = self._infer(batch)
            results.extend([d for d in self._detections(s, low) if d.score >= by_class.get(d.label, threshold)]
                           for s in samples)
        return results

    def _prepare(self, images: Sequence[np.ndarray], keys: Sequence[str | None]) -> dict:
        items = []
        for image, key in zip(images, keys):
            _check_image(image)
            # Models are trained on cv2-loaded (BGR) images.
            bgr = np.ascontiguousarray(image[..., ::-1])
            items.append(self._pipeline(dict(img=bgr, img_id=0, content_key=key)))
        return {"inputs": [i["inputs"] for i in items],
                "data_samples": [i["data_samples"] for i in items]}

    def _infer(self, batch: dict) -> list:
        import torch

        with torch.no_grad():
            return self._model.test_step(batch)

    def _detections(self, sample: Any, threshold: float) -> list[Detection]:
        pred = sample.pred_instances
        keep = pred.scores >= threshold
        scores = pred.scores[keep].cpu().numpy()
        labels = pred.labels[keep].cpu().numpy()
        height, width = sample.ori_shape[:2]
        # Boxes may reach into the padding; clip them to the image.
        bboxes = pred.bboxes[keep].cpu().numpy().clip(0, [width, height, width, height])
        masks = pred.masks[keep].cpu().numpy().astype(bool) if "masks" in pred else None
        if masks is not None and masks.shape[1:] != (height, width):
            masks = np.stack([exact_size(m, height, width) for m in masks]) if len(masks) else \
                np.zeros((0, height, width), dtype=bool)
        return [
            Detection(label=self.classes[int(labels[i])], score=float(scores[i]),
                      bbox=tuple(float(v) for v in bboxes[i]),
                      mask=masks[i] if masks is not None else None)
            for i in range(len(scores))
        ]


def exact_size(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """``mask`` at exactly height x width. Heads that paste masks on a rounded rescaled canvas can be a pixel
    short or long (1023 x 725 on a 1024 x 725 image): resize (nearest) to the image's size."""
    import cv2

    if mask.shape == (height, width):
        return mask
    return cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST).astype(bool)


def _set_score_threshold(model: Any, threshold: float) -> None:
    """Make the heads' own score filter (0.05 upstream) follow our threshold."""
    for module in model.modules():
        test_cfg = getattr(module, "test_cfg", None)
        if isinstance(test_cfg, dict) and "score_thr" in test_cfg:
            test_cfg["score_thr"] = threshold


def _check_image(image: np.ndarray) -> None:
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8
            and image.ndim == 3 and image.shape[2] == 3):
        raise ValueError("expected an RGB uint8 array of shape HxWx3")


def _read_classes(path: Path) -> list[str]:
    try:
        classes = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read class list {path}: {exc}") from exc
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise ModelLoadError(f"{path} must hold a non-empty JSON list of class names")
    return classes


def _read_config(path: Path) -> Any:
    from mmengine.config import Config

    try:
        return Config.fromfile(str(path))
    except Exception as exc:  # noqa: BLE001 - mmengine raises many kinds
        raise ModelLoadError(f"cannot read model config {path}: {exc}") from exc


def _build_model(cfg: Any, weights: Path, device: str) -> Any:
    import torch
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules()
    _import_custom(cfg)
    model = MODELS.build(cfg.model)
    try:
        # Registry weights are plain state dicts: no pickled objects needed.
        checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt files raise many kinds
        raise ModelLoadError(f"cannot load weights {weights}: {exc}") from exc
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ModelLoadError(f"{weights} holds no state dict")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # tensor shape mismatch (e.g. other class count)
        raise ModelLoadError(f"{weights} does not match the config: {exc}") from exc
    frozen = tuple(getattr(model, "frozen_prefixes", ()))  # pretrained parts loaded from their own checkpoint
    missing = [k for k in result.missing_keys if not (frozen and k.startswith(frozen))]
    if missing or result.unexpected_keys:
        raise ModelLoadError(
            f"{weights} does not match {cfg.get('arch', 'the config')}: "
            f"missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")
    return model.to(device).eval()


def _import_custom(cfg: Any) -> None:
    """Register the modules a config names in custom_imports (sam-det's), whatever the config's origin."""
    import importlib

    for name in (cfg.get("custom_imports") or {}).get("imports", []):
        if not str(name).startswith("appliance."):
            raise ModelLoadError(f"config imports {name!r}: only appliance modules are allowed")
        importlib.import_module(name)


def _build_pipeline(cfg: Any, embedding_store: Path | None = None, embedding_store_mb: int = 2048) -> Any:
    from mmcv.transforms import Compose

    steps = [dict(s) for s in cfg.test_pipeline if s["type"] != "LoadAnnotations"]
    steps[0] = dict(type="LoadImageFromNDArray")
    for step in steps:
        if step["type"] == "LoadSamEmbedding":  # this process's store, not the one of the training run
            step.update(store_dir=str(embedding_store) if embedding_store else None, store_mb=embedding_store_mb)
    for step in steps:  # explicit scope: independent of mmengine's global default scope
        if "." not in step["type"]:
            step["type"] = "mmdet." + step["type"]
    return Compose(steps)
