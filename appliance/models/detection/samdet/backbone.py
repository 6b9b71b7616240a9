"""SAM's image encoder as a frozen MMDetection backbone, and a ViTDet-style simple feature pyramid over it."""

from __future__ import annotations

import torch
from mmcv.cnn import ConvModule
from mmdet.registry import MODELS
from mmengine.model import BaseModule
from torch import nn

from appliance.models.detection.samdet.sam_parts import load_sam


@MODELS.register_module()
class SamImageEncoder(BaseModule):
    """Frozen SAM image encoder. Input: SAM-preprocessed images (Bx3x1024x1024) or precomputed embeddings
    (Bx256x64x64, passed through). Output: the Bx256x64x64 stride-16 embedding."""

    def __init__(self, model_type: str = "vit_t", checkpoint: str | None = None, init_cfg=None) -> None:
        super().__init__(init_cfg)
        self.encoder = load_sam(model_type, checkpoint).image_encoder
        self.encoder.requires_grad_(False)
        self.embed_dim = 256

    def init_weights(self) -> None:
        """The weights come from the SAM checkpoint; nothing to initialise (and nothing to overwrite)."""

    def train(self, mode: bool = True) -> "SamImageEncoder":
        super().train(mode)
        self.encoder.eval()  # frozen: its norm layers keep their statistics
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == self.embed_dim:
            return x
        with torch.no_grad():
            return self.encoder(x)


@MODELS.register_module()
class SamSimpleFPN(BaseModule):
    """ViTDet's simple feature pyramid: one stride-16 map -> maps at 16/scale for each scale (2.0 -> stride 8,
    1.0 -> 16, 0.5 -> 32), each reduced to ``out_channels`` (1x1) then smoothed (3x3)."""

    def __init__(self, in_channels: int = 256, out_channels: int = 64, scales: tuple = (2.0, 1.0, 0.5),
                 norm_cfg: dict | None = None, act_cfg: dict | None = None, init_cfg=None) -> None:
        super().__init__(init_cfg)
        norm_cfg = norm_cfg or dict(type="BN")
        act_cfg = act_cfg or dict(type="SiLU")
        self.stages = nn.ModuleList()
        for scale in scales:
            layers: list[nn.Module] = [ConvModule(in_channels, out_channels, 1, norm_cfg=norm_cfg, act_cfg=act_cfg)]
            if scale == 4.0:
                layers += [nn.ConvTranspose2d(out_channels, out_channels, 2, stride=2), nn.SiLU(),
                           nn.ConvTranspose2d(out_channels, out_channels, 2, stride=2)]
            elif scale == 2.0:
                layers += [nn.ConvTranspose2d(out_channels, out_channels, 2, stride=2)]
            elif scale == 0.5:
                layers += [nn.MaxPool2d(2, 2)]
            elif scale != 1.0:
                raise ValueError(f"unsupported scale {scale}; use 4.0, 2.0, 1.0 or 0.5")
            layers += [ConvModule(out_channels, out_channels, 3, padding=1, norm_cfg=norm_cfg, act_cfg=act_cfg)]
            self.stages.append(nn.Sequential(*layers))

    def forward(self, x) -> tuple[torch.Tensor, ...]:
        if isinstance(x, (tuple, list)):
            x = x[-1]
        return tuple(stage(x) for stage in self.stages)
