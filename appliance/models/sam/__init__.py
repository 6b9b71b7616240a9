"""Interactive Segment Anything: checkpoint lookup, encoder/decoder engine, embedding cache, mask formats."""

from .cache import EmbeddingCache, content_key
from .engine import Embedding, PromptError, SamEngine
from .masks import brush_rle_to_mask, mask_to_brush_rle, mask_to_polygons
from .weights import WeightsError, mobile_sam_path, verify_checkpoint

__all__ = ["Embedding", "EmbeddingCache", "PromptError", "SamEngine", "WeightsError", "brush_rle_to_mask",
           "content_key", "mask_to_brush_rle", "mask_to_polygons", "mobile_sam_path", "verify_checkpoint"]
