"""SAM's mask decoder for many prompts of one image at once, each a single point (sam-prompt's proposals) or a box
(sam-det's masks), in PyTorch or exported to ONNX and run by ONNX Runtime: 32 points on 2 CPU cores in ~2 s where
SAM's own decoder call takes ~4.5 s.

``PromptDecoder`` is SAM's ``MaskDecoder.predict_masks`` with the image's embedding broadcast to the prompts instead
of copied per prompt, and the prompt encoder's "no mask" embedding folded in: the same masks (tests/test_sam_onnx.py),
and a graph the ONNX exporter traces with the number of prompts left free. A point's prompt (the point and SAM's
padding point) and a box's (two corners) are both two tokens, so one export serves both.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import onnx_encoder

log = logging.getLogger("sam.onnx")

PART = "prompt-decoder"


class PromptDecoder(nn.Module):
    """Image embedding (1 x 256 x 64 x 64) and N sparse prompt embeddings (N x 2 x 256) in; SAM's four masks per
    prompt (N x 4 x 256 x 256 low-res logits: the single-mask output, then the multimask output's whole, part and
    sub-part) and their predicted IoUs (N x 4) out."""

    def __init__(self, prompt_encoder: nn.Module, mask_decoder: nn.Module) -> None:
        super().__init__()
        self.decoder = mask_decoder
        self.register_buffer("image_pe", prompt_encoder.get_dense_pe(), persistent=False)
        no_mask = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        self.register_buffer("no_mask", no_mask.detach().clone(), persistent=False)

    def forward(self, features: torch.Tensor, sparse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        decoder, n = self.decoder, sparse.shape[0]
        channels, height, width = features.shape[1:]
        tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], 0)
        tokens = torch.cat((tokens.unsqueeze(0).expand(n, -1, -1), sparse), 1)
        src = (features + self.no_mask).expand(n, -1, -1, -1)
        hs, src = decoder.transformer(src, self.image_pe.expand(n, -1, -1, -1), tokens)
        upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(n, channels, height, width))
        mask_tokens = hs[:, 1:1 + decoder.num_mask_tokens, :]
        hyper = torch.stack([mlp(mask_tokens[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], 1)
        size = upscaled.shape[-2:]
        masks = (hyper @ upscaled.flatten(2)).reshape(n, -1, *size)
        iou = decoder.iou_prediction_head(hs[:, 0, :])
        return masks, iou


def point_prompts(prompt_encoder: nn.Module, points: torch.Tensor) -> torch.Tensor:
    """The sparse prompt embeddings (N x 2 x 256) of N single positive points (x, y in the encoder's input frame)."""
    xy = points[:, None].float()
    labels = torch.ones(xy.shape[:2], dtype=torch.int, device=xy.device)
    sparse, _ = prompt_encoder(points=(xy, labels), boxes=None, masks=None)
    return sparse


def box_prompts(prompt_encoder: nn.Module, boxes: torch.Tensor) -> torch.Tensor:
    """The sparse prompt embeddings (N x 2 x 256) of N boxes (x0, y0, x1, y1 in the encoder's input frame)."""
    sparse, _ = prompt_encoder(points=None, boxes=boxes.float(), masks=None)
    return sparse


class OnnxPromptDecoder:
    """The exported ``PromptDecoder`` on ONNX Runtime (on this graph faster than OpenVINO: 32 points in 1.5 s on
    2 cores, OpenVINO 1.8 s)."""

    def __init__(self, path: Path, threads: int = 1) -> None:
        self.path = path
        self.session = onnx_encoder.ort_session(path, threads)

    def __call__(self, features: torch.Tensor, sparse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = {"features": _array(features), "sparse": _array(sparse)}
        logits, iou = self.session.run(None, inputs)
        return torch.from_numpy(logits), torch.from_numpy(iou)


def _array(tensor: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().cpu().numpy(), dtype=np.float32)


def export(sam: nn.Module, path: Path) -> Path:
    """Export ``sam``'s ``PromptDecoder`` to ``path`` (atomically), the number of prompts left free."""
    channels, height, width = (int(v) for v in sam.prompt_encoder.get_dense_pe().shape[1:])
    example = (torch.zeros(1, channels, height, width), torch.zeros(2, 2, channels))
    decoder = PromptDecoder(sam.prompt_encoder, sam.mask_decoder).eval()
    free = {"sparse": {0: "prompts"}, "logits": {0: "prompts"}, "iou": {0: "prompts"}}
    return onnx_encoder.export_module(decoder, example, path, input_names=["features", "sparse"],
                                      output_names=["logits", "iou"], dynamic_axes=free)


def installed(checkpoint: Path, model_type: str, threads: int = 1) -> OnnxPromptDecoder | None:
    """The install's export for this checkpoint on ONNX Runtime; None where there is none or it cannot load
    (PyTorch's ``PromptDecoder`` gives the same masks)."""
    path = onnx_encoder.cache_path(onnx_encoder.INSTALLED_DIR, checkpoint, model_type, PART)
    if not path.is_file():
        return None
    try:
        return OnnxPromptDecoder(path, threads)
    except Exception as error:
        log.warning("SAM prompt decoder stays on PyTorch: %s", str(error).splitlines()[0] if str(error) else error)
        return None
