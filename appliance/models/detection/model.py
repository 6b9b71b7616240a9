"""Inference with a trained model from a registry version directory."""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from appliance import compat


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
                 batch_size: int = 8) -> None:
        compat.install()
        self.model_dir = Path(model_dir)
        self.device = _pick_device(device)
        self.score_threshold = score_threshold
        self.batch_size = batch_size
        self.classes = _read_classes(self.model_dir / "classes.json")
        self.cfg = _read_config(self.model_dir / "config.py")
        self._model = _build_model(self.cfg, self.model_dir / "weights.pth", self.device)
        self._model.dataset_meta = {"classes": tuple(self.classes)}
        self._pipeline = _build_pipeline(self.cfg)
        self._lock = threading.Lock()

    def predict(self, image: np.ndarray, score_threshold: float | None = None) -> list[Detection]:
        """Detections in one RGB uint8 HxWx3 image."""
        return self.predict_batch([image], score_threshold)[0]

    def predict_batch(self, images: Sequence[np.ndarray],
                      score_threshold: float | None = None) -> list[list[Detection]]:
        """Detections per image; images go through the model batch_size at a time."""
        threshold = self.score_threshold if score_threshold is None else score_threshold
        results: list[list[Detection]] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            batch = self._prepare(chunk)
            with self._lock:
                _set_score_threshold(self._model, threshold)
                samples = self._infer(batch)
            results.extend(self._detections(s, threshold) for s in samples)
        return results

    def _prepare(self, images: Sequence[np.ndarray]) -> dict:
        items = []
        for image in images:
            _check_image(image)
            # Models are trained on cv2-loaded (BGR) images.
            bgr = np.ascontiguousarray(image[..., ::-1])
            items.append(self._pipeline(dict(img=bgr, img_id=0)))
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
        return [
            Detection(label=self.classes[int(labels[i])], score=float(scores[i]),
                      bbox=tuple(float(v) for v in bboxes[i]),
                      mask=masks[i] if masks is not None else None)
            for i in range(len(scores))
        ]


def _set_score_threshold(model: Any, threshold: float) -> None:
    """Make the heads' own score filter (0.05 upstream) follow our threshold."""
    for module in model.modules():
        test_cfg = getattr(module, "test_cfg", None)
        if isinstance(test_cfg, dict) and "score_thr" in test_cfg:
            test_cfg["score_thr"] = threshold


def _pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


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
    if result.missing_keys or result.unexpected_keys:
        raise ModelLoadError(
            f"{weights} does not match {cfg.get('arch', 'the config')}: "
            f"missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
    return model.to(device).eval()


def _build_pipeline(cfg: Any) -> Any:
    from mmcv.transforms import Compose

    steps = [dict(s) for s in cfg.test_pipeline if s["type"] != "LoadAnnotations"]
    steps[0] = dict(type="LoadImageFromNDArray")
    for step in steps:  # explicit scope: independent of mmengine's global default scope
        if "." not in step["type"]:
            step["type"] = "mmdet." + step["type"]
    return Compose(steps)
