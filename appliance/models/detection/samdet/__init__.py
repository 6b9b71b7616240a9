"""sam-det: a detector on SAM's frozen image encoder, as MMDetection modules.

Importing this package registers its modules in MMDetection's registries (MODELS, TRANSFORMS, DATASETS):

- ``SamImageEncoder`` (backbone): the SAM image encoder (MobileSAM's TinyViT by default), frozen. It takes either
  SAM-preprocessed images (3x1024x1024) or, what the pipelines feed it, precomputed 256x64x64 embeddings, which it
  passes through: training and inference on stored embeddings run only the neck and the head.
- ``SamSimpleFPN`` (neck): ViTDet's simple feature pyramid over the single stride-16 map (strides 8, 16, 32).
- ``SamDetector`` (detector): RTMDet's box head on the pyramid; each predicted box prompts SAM's own mask decoder,
  so instance masks have SAM's quality and the image's exact size.
- ``SamPromptDetector`` (detector, arch ``sam-prompt``, prompted.py): no box regression; a heat map on the embedding
  says where objects of each class lie, its peaks prompt SAM's decoder, and an MLP on each candidate mask's pooled
  embedding scores it. Learns natural objects (people, cars) from tens of photos where the box head does not.
- ``LoadSamEmbedding`` (transform) and ``SamEmbeddingCocoDataset``: the embedding of each image from the shared
  on-disk store (``appliance.models.sam.store``), computed and stored once when missing; boxes go to SAM's input
  frame (longest side 1024, padded bottom-right), the geometry the embedding was computed in.
"""

from appliance import compat

compat.install()  # before anything imports mmdet (mmcv-lite has no compiled ops)

from appliance.models.detection.samdet import backbone, detector, inputs, prompted  # noqa: E402,F401  (registers)
