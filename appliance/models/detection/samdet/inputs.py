"""Pipeline pieces of sam-det: each image becomes its stored SAM embedding, its boxes move to SAM's input frame."""

from __future__ import annotations

import numpy as np
from mmcv.transforms import BaseTransform
from mmdet.datasets import CocoDataset
from mmdet.registry import DATASETS, TRANSFORMS

from appliance.models.detection.samdet.sam_parts import encode, input_size, load_sam
from appliance.models.sam.cache import content_key
from appliance.models.sam.store import EmbeddingStore, remote_tier


@DATASETS.register_module()
class SamEmbeddingCocoDataset(CocoDataset):
    """CocoDataset that keeps each image's ``content_key`` (written by the trainer's dataset builder): the key of
    its embedding in the shared store, so a stored embedding is used without reading the image."""

    def parse_data_info(self, raw_data_info: dict):
        info = super().parse_data_info(raw_data_info)
        info["content_key"] = raw_data_info["raw_img_info"].get("content_key")
        return info


@TRANSFORMS.register_module()
class LoadSamEmbedding(BaseTransform):
    """results["img"] := the image's 64x64x256 SAM embedding (HWC, for PackDetInputs), from the store by
    ``content_key`` or computed from the image (``img``, BGR as mmcv loads it, or read from ``img_path``) and
    stored. Sets ori_shape, img_shape (the resized image inside SAM's padded 1024 input) and scale_factor, and
    rescales gt_bboxes to that frame. No flip or other augmentation: a flipped embedding is not the embedding of
    the flipped image."""

    def __init__(self, store_dir: str | None = None, store_mb: int = 2048, model_type: str = "vit_t",
                 checkpoint: str | None = None) -> None:
        self.store_dir, self.store_mb = store_dir, store_mb
        self.model_type, self.checkpoint = model_type, checkpoint
        self._store = None
        if store_dir and store_mb > 0:
            self._store = EmbeddingStore(store_dir, store_mb * 1024 * 1024, model_type, remote=remote_tier())

    def transform(self, results: dict) -> dict:
        key = results.get("content_key")
        embedding = self._store.get(key) if (self._store is not None and key) else None
        image = results.get("img")
        if embedding is None and image is None:
            import mmcv

            image = mmcv.imread(results["img_path"])
        if image is not None:
            height, width = image.shape[:2]
        else:
            height, width = int(results["height"]), int(results["width"])
        if embedding is None:
            rgb = np.ascontiguousarray(image[..., ::-1])
            if not key:  # no file key: the pixels' own, so the next epoch or call finds it
                key = pixel_key(rgb)
                embedding = self._store.get(key) if self._store is not None else None
            if embedding is None:
                embedding = encode(load_sam(self.model_type, self.checkpoint), rgb)
                if self._store is not None:
                    self._store.put(key, embedding)
        in_h, in_w = input_size(height, width)
        scale = (in_w / width, in_h / height)
        results["img"] = embedding.transpose(1, 2, 0)
        results["ori_shape"] = (height, width)
        results["img_shape"] = (in_h, in_w)
        results["scale_factor"] = scale
        if results.get("gt_bboxes") is not None:
            results["gt_bboxes"].rescale_(scale)
            results["gt_bboxes"].clip_((in_h, in_w))
        return results


def pixel_key(rgb: np.ndarray) -> str:
    """Key of decoded pixels, for images that come without their file's content key."""
    return "px" + content_key(np.ascontiguousarray(rgb).tobytes() + str(rgb.shape).encode())[:38]
