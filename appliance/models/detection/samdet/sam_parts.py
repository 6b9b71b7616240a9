"""The SAM model the sam-det modules share in one process, and SAM's own image preprocessing and mask decoding."""

from __future__ import annotations

import functools
import logging
import threading
import weakref

import numpy as np
import torch
import torch.nn.functional as F

from appliance.models.sam import prompt_decoder
from appliance.models.sam.engine import build_model, encoder_input
from appliance.models.sam.onnx_encoder import load_or_export
from appliance.models.sam.weights import checkpoint_path

log = logging.getLogger("samdet")

EMBED_STRIDE = 16  # SAM's image encoder: 1024x1024 input -> 64x64 embedding
_lock = threading.Lock()
# The install's ONNX export of a loaded model's image encoder on a CPU engine (same features, faster).
_onnx: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Per loaded model's mask decoder: the install's export of its prompt decoder on ONNX Runtime (the same masks).
_prompt_decoders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@functools.lru_cache(maxsize=2)
def _load(model_type: str, checkpoint: str | None) -> torch.nn.Module:
    path = checkpoint_path(model_type, checkpoint)
    model = build_model(path, model_type, torch.device("cpu"))
    model.requires_grad_(False)
    try:  # the install's export when there is one (the same features as PyTorch's encoder, faster on a CPU)
        _onnx[model] = load_or_export(model.image_encoder, model.image_encoder.img_size, path, model_type, None,
                                      torch.get_num_threads())
    except FileNotFoundError:
        pass
    except Exception as error:  # PyTorch's encoder gives the same features
        log.warning("SAM encoder stays on PyTorch: %s", str(error).splitlines()[0] if str(error) else error)
    exported = prompt_decoder.installed(path, model_type, torch.get_num_threads())
    if exported is not None:
        _prompt_decoders[model.mask_decoder] = exported
    return model.eval()


def load_sam(model_type: str = "vit_t", checkpoint: str | None = None) -> torch.nn.Module:
    """One frozen SAM model per (type, checkpoint) and process: backbone, decoder and pipeline share it."""
    with _lock:
        return _load(model_type, str(checkpoint) if checkpoint else None)


def input_size(height: int, width: int, image_size: int = 1024) -> tuple[int, int]:
    """(H, W) of the image resized so its longest side is ``image_size`` (SAM's ResizeLongestSide)."""
    scale = image_size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def encode(sam: torch.nn.Module, rgb: np.ndarray) -> np.ndarray:
    """The 256x64x64 float32 embedding of an RGB uint8 image, with the SAM backend's own input preparation."""
    with torch.no_grad():
        features = _onnx.get(sam, sam.image_encoder)(encoder_input(sam, rgb)[0])
    return features[0].float().cpu().numpy()


def preprocess(sam: torch.nn.Module, rgb: np.ndarray) -> torch.Tensor:
    """SAM's encoder input (3x1024x1024, normalised, padded) for an RGB uint8 image."""
    return encoder_input(sam, rgb)[0][0]


def box_masks(prompt_encoder: torch.nn.Module, mask_decoder: torch.nn.Module, features: torch.Tensor,
              boxes: torch.Tensor, in_size: tuple[int, int], out_size: tuple[int, int], image_size: int = 1024,
              chunk: int = 8) -> torch.Tensor:
    """Bool masks (N x out_size) from SAM's decoder, one per box (x0, y0, x1, y1 in the encoder's input frame).

    ``features`` is the 1x256x64x64 embedding; ``in_size`` the (H, W) of the resized image inside the padded
    input; the masks are upsampled as SAM's own postprocess_masks does, straight to ``out_size``.
    """
    height, width = int(out_size[0]), int(out_size[1])
    if boxes.numel() == 0:
        return torch.zeros((0, height, width), dtype=torch.bool, device=features.device)
    masks = []
    for low_res, _ in _decoded(prompt_encoder, mask_decoder, features, prompt_decoder.box_prompts, boxes, chunk):
        low_res = low_res[:, :1]  # SAM's single-mask output: the box's object
        # SAM upsamples to the padded input, crops the image and resizes to the original size; cropping the
        # low-res logits first and resizing once is the same up to interpolation and much cheaper.
        scale = low_res.shape[-1] / image_size
        crop_h, crop_w = max(1, round(in_size[0] * scale)), max(1, round(in_size[1] * scale))
        logits = F.interpolate(low_res[..., :crop_h, :crop_w], (height, width), mode="bilinear", align_corners=False)
        masks.append(logits[:, 0] > 0.0)
    return torch.cat(masks)


def point_masks(prompt_encoder: torch.nn.Module, mask_decoder: torch.nn.Module, features: torch.Tensor,
                points: torch.Tensor, chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's multimask output for each positive point: (3N x 256 x 256 low-res logits, 3N predicted IoUs)."""
    logits, ious = [], []
    for low_res, iou in _decoded(prompt_encoder, mask_decoder, features, prompt_decoder.point_prompts, points, chunk):
        logits.append(low_res[:, 1:].flatten(0, 1))
        ious.append(iou[:, 1:].flatten())
    return torch.cat(logits), torch.cat(ious)


def _decoded(prompt_encoder: torch.nn.Module, mask_decoder: torch.nn.Module, features: torch.Tensor, prompts,
             items: torch.Tensor, chunk: int):
    """SAM's four masks and IoUs per prompt, ``chunk`` prompts at a time (more hold hundreds of MB of activations
    for no speed on a CPU): on the install's ONNX export for a CPU (2-3x faster), else PyTorch."""
    run = _prompt_decoders.get(mask_decoder)
    if run is None or features.device.type != "cpu":
        run = prompt_decoder.PromptDecoder(prompt_encoder, mask_decoder).to(features.device)
    for start in range(0, items.shape[0], chunk):
        with torch.no_grad():  # not around the yield: the caller's code would run without gradients
            low_res, iou = run(features, prompts(prompt_encoder, items[start:start + chunk]))
        yield low_res.to(features.device), iou.to(features.device)
