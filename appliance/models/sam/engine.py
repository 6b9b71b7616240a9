"""Segment Anything inference: one image encoder pass per image, cheap prompt decoding per click.

``segment`` is a pure function of an ``Embedding`` and the prompts (it calls the model's prompt encoder and mask
decoder directly rather than going through ``SamPredictor``'s mutable state), so clicks may decode concurrently.
"""

from __future__ import annotations

import math
import pickle
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from segment_anything.utils.transforms import ResizeLongestSide

from ..device import resolve_device
from .weights import WeightsError, checkpoint_path

MODEL_TYPES = ("vit_t", "vit_b", "vit_l", "vit_h")

# Prompts converted from Label Studio's percentages can overshoot the border by float error: accept and clamp.
EDGE_TOLERANCE_PX = 0.5

Point = tuple[float, float]
Box = tuple[float, float, float, float]


class PromptError(ValueError):
    """The prompts cannot be decoded (empty, malformed or outside the image)."""


@dataclass(frozen=True, eq=False)
class Embedding:
    """Image features from the encoder plus the geometry needed to map prompts and masks."""

    features: torch.Tensor  # 1 x 256 x 64 x 64, on the engine's device
    original_size: tuple[int, int]  # (H, W) of the image given to embed()
    input_size: tuple[int, int]  # (H, W) after resizing the long side to the encoder's size
    nbytes: int


@dataclass(frozen=True, eq=False)
class Decoded:
    mask: np.ndarray  # bool H x W of the original image
    score: float  # SAM's predicted IoU
    logits: torch.Tensor  # 1 x 1 x 256 x 256 low-resolution logits: the next click's mask_input
    reach: np.ndarray | None = None  # a lone click's three candidates together (bool H x W): how far it may reach


def _registry(model_type: str) -> dict:
    if model_type == "vit_t":
        with warnings.catch_warnings():  # mobile_sam re-registers timm models and imports deprecated paths
            warnings.simplefilter("ignore")
            from mobile_sam import sam_model_registry
        return sam_model_registry
    from segment_anything import sam_model_registry
    return sam_model_registry


def encoder_input(model: torch.nn.Module, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
    """SAM's encoder input for an RGB uint8 image (1x3xSxS: long side resized to S, normalised, padded) and the
    (H, W) of the resized image inside it. The one place every SAM encode in the appliance prepares pixels."""
    size = model.image_encoder.img_size
    resized = ResizeLongestSide(size).apply_image(np.ascontiguousarray(image))
    device = next(model.parameters()).device
    tensor = torch.as_tensor(resized, device=device).permute(2, 0, 1).contiguous()[None]
    return model.preprocess(tensor), (int(tensor.shape[-2]), int(tensor.shape[-1]))


def build_model(checkpoint: Path, model_type: str, device: torch.device) -> torch.nn.Module:
    """Build the architecture for ``model_type`` and load ``checkpoint`` into it (strict)."""
    model = _registry(model_type)[model_type](checkpoint=None)
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, OSError, KeyError, TypeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"cannot load {checkpoint} as a SAM {model_type} checkpoint ({first}); "
                           f"check APPLIANCE_SAM_CHECKPOINT and the model type") from exc
    return model.to(device).eval()


class SamEngine:
    def __init__(self, checkpoint: Path | str | None = None, model_type: str = "vit_t", device: str = "auto",
                 sha256: str | None = None) -> None:
        if model_type not in MODEL_TYPES:
            raise ValueError(f"unknown SAM model type {model_type!r}; expected one of {', '.join(MODEL_TYPES)}")
        self.checkpoint = checkpoint_path(model_type, checkpoint, sha256)
        self.model_type = model_type
        self.device = torch.device(resolve_device(device))
        self.model = build_model(self.checkpoint, model_type, self.device)
        self.image_size: int = self.model.image_encoder.img_size
        self.transform = ResizeLongestSide(self.image_size)
        self._encode_lock = threading.Lock()
        self._encoder = self.model.image_encoder  # swapped for a CPU inference engine by use_onnx()
        self.encoder_name = "torch"
        with torch.inference_mode():  # constant positional encoding of the embedding grid: compute it once
            self._dense_pe = self.model.prompt_encoder.get_dense_pe()

    # --- encoder ----------------------------------------------------------------------------
    def embed(self, image: np.ndarray) -> Embedding:
        """Run the image encoder on an RGB uint8 HxWx3 image."""
        _check_image(image)
        # One encode at a time: it is the memory- and compute-heavy step, and already uses all intra-op threads.
        with self._encode_lock, torch.inference_mode():
            pixels, input_size = encoder_input(self.model, image)
            features = self._encoder(pixels).to(self.device)
        return Embedding(features=features, original_size=(int(image.shape[0]), int(image.shape[1])),
                         input_size=input_size, nbytes=features.element_size() * features.nelement())

    def use_onnx(self, cache_dir: Path | None, threads: int = 1, runtime: str = "auto") -> None:
        """Encode with a CPU inference engine from now on (``runtime``: auto, openvino or onnxruntime; see
        onnx_encoder.py): the install's export of this checkpoint's encoder, else one exported once into
        ``cache_dir`` (None: the installed export or nothing). Raises when the export or the engine fails; the
        PyTorch encoder then stays in use."""
        if self.device.type != "cpu":
            raise RuntimeError(f"the ONNX encoder runs on the CPU; this engine runs on {self.device}")
        from .onnx_encoder import load_or_export

        encoder = load_or_export(self.model.image_encoder, self.image_size, self.checkpoint, self.model_type,
                                 cache_dir, threads, runtime)
        with self._encode_lock:
            self._encoder, self.encoder_name = encoder, encoder.name

    def from_features(self, features: np.ndarray, original_size: tuple[int, int]) -> Embedding:
        """An Embedding from stored encoder features (256x64x64) of an image of ``original_size`` (H, W)."""
        tensor = torch.as_tensor(np.asarray(features, dtype=np.float32), device=self.device)
        if tensor.ndim == 3:
            tensor = tensor[None]
        height, width = int(original_size[0]), int(original_size[1])
        return Embedding(features=tensor, original_size=(height, width),
                         input_size=ResizeLongestSide.get_preprocess_shape(height, width, self.image_size),
                         nbytes=tensor.element_size() * tensor.nelement())

    # --- decoder ----------------------------------------------------------------------------
    def segment(self, embedding: Embedding, points: Sequence[Point] = (), labels: Sequence[int] = (),
                box: Box | None = None) -> tuple[np.ndarray, float]:
        """Decode one mask (bool HxW of the original image) and its predicted IoU for the prompts."""
        decoded = self.decode(embedding, points, labels, box)
        return decoded.mask, decoded.score

    def decode(self, embedding: Embedding, points: Sequence[Point] = (), labels: Sequence[int] = (),
               box: Box | None = None, mask_input: torch.Tensor | None = None, reach: bool = False) -> Decoded:
        """Decode one mask for the prompts, with its predicted IoU and low-resolution logits.

        Points are (x, y) pixels of the original image; labels 1 = positive, 0 = negative.
        A lone point is ambiguous, so SAM's three candidate masks are scored and the best returned;
        with more prompts a single mask is asked for (SAM's documented practice). ``mask_input`` is the
        object's previous ``Decoded.logits``: fed back on the next click, as SamPredictor's ``mask_input``.
        ``reach`` asks, for a lone click, for the union of the three candidates too (``Decoded.reach``).
        """
        _check_prompts(embedding.original_size, points, labels, box)
        coords, point_labels, box_t = self._prompt_tensors(embedding, points, labels, box)
        multimask = len(points) == 1 and box is None and mask_input is None
        model = self.model
        with torch.inference_mode():
            sparse, dense = model.prompt_encoder(
                points=(coords, point_labels) if coords is not None else None, boxes=box_t,
                masks=None if mask_input is None else mask_input.to(self.device))
            low_res, iou = model.mask_decoder(
                image_embeddings=embedding.features, image_pe=self._dense_pe,
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask)
            best = int(torch.argmax(iou[0]))
            chosen = low_res[:, best:best + 1]
            # Upscale only the chosen mask (and the candidates' union when asked): postprocessing is a large share of
            # the per-click cost.
            with_reach = reach and multimask
            upscaled = torch.cat([chosen, low_res.amax(1, keepdim=True)], 1) if with_reach else chosen
            logits = model.postprocess_masks(upscaled, embedding.input_size, embedding.original_size)
            masks = (logits[0] > model.mask_threshold).cpu().numpy()
        return Decoded(masks[0], float(iou[0, best]), chosen.clone(), masks[1] if with_reach else None)

    def _prompt_tensors(self, embedding: Embedding, points: Sequence[Point], labels: Sequence[int],
                        box: Box | None) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        coords = point_labels = box_t = None
        height, width = embedding.original_size
        if len(points):
            xy = np.clip(np.asarray(points, dtype=np.float64), 0, [width, height])
            xy = self.transform.apply_coords(xy, embedding.original_size)
            coords = torch.as_tensor(xy, dtype=torch.float, device=self.device)[None]
            point_labels = torch.as_tensor(list(labels), dtype=torch.int, device=self.device)[None]
        if box is not None:
            xyxy = np.clip(np.asarray(box, dtype=np.float64)[None], 0, [width, height, width, height])
            xyxy = self.transform.apply_boxes(xyxy, embedding.original_size)
            box_t = torch.as_tensor(xyxy, dtype=torch.float, device=self.device)
        return coords, point_labels, box_t


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"SAM needs an RGB uint8 HxWx3 image, got shape {shape} dtype {dtype}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"SAM needs a non-empty image, got shape {image.shape}")


def _check_prompts(size: tuple[int, int], points: Sequence[Point], labels: Sequence[int],
                   box: Box | None) -> None:
    height, width = size
    if len(points) != len(labels):
        raise PromptError(f"{len(points)} points but {len(labels)} labels: give one label per point")
    if not len(points) and box is None:
        raise PromptError("no prompt: give at least one point or a box")
    for i, (point, label) in enumerate(zip(points, labels)):
        if label not in (0, 1):
            raise PromptError(f"point {i} has label {label!r}; use 1 (positive) or 0 (negative)")
        x, y = _finite(point, 2, f"point {i}")
        if not (_within(x, width) and _within(y, height)):
            raise PromptError(f"point {i} ({x:g}, {y:g}) is outside the {width}x{height} image")
    if box is None and not any(label == 1 for label in labels):
        raise PromptError("only negative points: add a positive point or a box")
    if box is not None:
        x0, y0, x1, y1 = _finite(box, 4, "box")
        if not (x0 < x1 and y0 < y1 and all(_within(v, width) for v in (x0, x1))
                and all(_within(v, height) for v in (y0, y1))):
            raise PromptError(f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) must be x0<x1, y0<y1 "
                              f"inside the {width}x{height} image")


def _within(value: float, limit: int) -> bool:
    return -EDGE_TOLERANCE_PX <= value <= limit + EDGE_TOLERANCE_PX


def _finite(values: Sequence[float], n: int, what: str) -> list[float]:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise PromptError(f"{what} must be {n} numbers, got {values!r}") from exc
    if len(out) != n or not all(math.isfinite(v) for v in out):
        raise PromptError(f"{what} must be {n} finite numbers, got {values!r}")
    return out
