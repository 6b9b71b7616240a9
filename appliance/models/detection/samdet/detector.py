"""The sam-det detector: boxes from an MMDetection head on SAM features, masks from SAM's decoder per box."""

from __future__ import annotations

import torch
from mmdet.models.data_preprocessors import DetDataPreprocessor
from mmdet.models.detectors import SingleStageDetector
from mmdet.registry import MODELS
from mmengine.model import BaseModule

from appliance.models.detection.samdet.sam_parts import EMBED_STRIDE, box_masks, load_sam, point_masks


@MODELS.register_module()
class SamBoxDecoder(BaseModule):
    """SAM's frozen prompt encoder and mask decoder: a box in, the object's mask out."""

    def __init__(self, model_type: str = "vit_t", checkpoint: str | None = None, init_cfg=None) -> None:
        super().__init__(init_cfg)
        sam = load_sam(model_type, checkpoint)
        self.prompt_encoder, self.mask_decoder = sam.prompt_encoder, sam.mask_decoder
        self.image_size = sam.image_encoder.img_size
        self.requires_grad_(False)

    def init_weights(self) -> None:
        """Weights come from the SAM checkpoint."""

    def train(self, mode: bool = True) -> "SamBoxDecoder":
        return super().train(False)

    def forward(self, features: torch.Tensor, boxes: torch.Tensor, in_size, out_size) -> torch.Tensor:
        return box_masks(self.prompt_encoder, self.mask_decoder, features, boxes, tuple(in_size), tuple(out_size),
                         self.image_size)

    def points(self, features: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's three candidate masks per positive point (N x 2, x y in the encoder's input frame): low-res
        logits (3N x 256 x 256) and predicted IoUs (3N), point by point."""
        return point_masks(self.prompt_encoder, self.mask_decoder, features, points)


@MODELS.register_module()
class SamEmbeddingPreprocessor(DetDataPreprocessor):
    """Stacks embeddings (or SAM-preprocessed images) as they are, and gives the heads the geometry of SAM's padded
    input (1024x1024), not of the 64x64 embedding: the heads place their priors and valid flags in that frame."""

    def __init__(self, **kwargs) -> None:
        kwargs.update(mean=None, std=None, bgr_to_rgb=False, rgb_to_bgr=False, pad_size_divisor=1)
        super().__init__(**kwargs)

    def forward(self, data: dict, training: bool = False) -> dict:
        data = super().forward(data, training)
        inputs, samples = data["inputs"], data["data_samples"]
        if inputs.shape[1] != 3 and samples is not None:  # embeddings: stride 16 to the input frame
            shape = (inputs.shape[-2] * EMBED_STRIDE, inputs.shape[-1] * EMBED_STRIDE)
            for sample in samples:
                sample.set_metainfo({"batch_input_shape": shape, "pad_shape": shape})
        return data


@MODELS.register_module()
class SamDetector(SingleStageDetector):
    """Backbone (frozen SAM encoder) -> SimpleFPN -> box head; masks from SAM's decoder prompted by each box."""

    # Loaded from the SAM checkpoint, never trained: left out of saved weights (see train._write_model).
    frozen_prefixes = ("backbone.", "sam_decoder.")

    def __init__(self, backbone: dict, neck: dict, bbox_head: dict, sam: dict | None = None, train_cfg=None,
                 test_cfg=None, data_preprocessor=None, init_cfg=None) -> None:
        super().__init__(backbone=backbone, neck=neck, bbox_head=bbox_head, train_cfg=train_cfg, test_cfg=test_cfg,
                         data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.sam_decoder = SamBoxDecoder(**(sam or {}))

    def predict(self, batch_inputs: torch.Tensor, batch_data_samples: list, rescale: bool = True) -> list:
        embeddings = self.backbone(batch_inputs)
        results = self.bbox_head.predict(self.neck(embeddings), batch_data_samples, rescale=rescale)
        # A mask costs a SAM decoder pass (~0.06 s per box on 2 CPU cores): none for boxes below mask_score_thr or
        # below the threshold asked (model.Detector sets score_thr to it).
        cfg = self.bbox_head.test_cfg
        floor = max(float(cfg.get("mask_score_thr", 0.0)), float(cfg.get("score_thr", 0.0)))
        results = [instances[instances.scores >= floor] for instances in results]
        for i, (instances, sample) in enumerate(zip(results, batch_data_samples)):
            meta = sample.metainfo
            boxes = instances.bboxes
            out_size = meta["ori_shape"] if rescale else meta["img_shape"]
            if rescale:  # back to the encoder's input frame for the prompt
                boxes = boxes * boxes.new_tensor(meta["scale_factor"]).repeat(2)
            instances.masks = self.sam_decoder(embeddings[i:i + 1], boxes, meta["img_shape"], out_size)
        return self.add_pred_to_datasample(batch_data_samples, results)
