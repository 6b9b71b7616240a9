"""Build mmengine Configs for the supported instance-segmentation architectures."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance import compat

DEFAULT_ARCH = "sam-det"
AUTO = "auto"
DENSE_OBJECTS = 16  # objects on a typical (median) training image above which "auto" trains sam-det


@dataclass(frozen=True)
class ArchSpec:
    config: str | None  # path inside mmdet's bundled configs (mmdet/.mim/configs); None: built here
    base_size: int      # the short image side the bundled pipelines are written for
    base_lr: float      # the recipe's learning rate for `base_batch` images per step
    base_batch: int


SAM_DET = "sam-det"
SAM_PROMPT = "sam-prompt"
SAM_ARCHS = (SAM_DET, SAM_PROMPT)  # on stored SAM embeddings (appliance.models.detection.samdet)

ARCHS: dict[str, ArchSpec] = {
    # A box head on SAM's frozen image encoder, masks from SAM's decoder (appliance.models.detection.samdet).
    # Its recipe: AdamW 2e-3 for a batch of 8.
    SAM_DET: ArchSpec(None, 1024, 0.002, 8),
    # SAM's own masks prompted at a learnt heat map's peaks, scored by an MLP on mask-pooled SAM features.
    SAM_PROMPT: ArchSpec(None, 1024, 0.02, 8),
    # ~5M params, trained from scratch. Recipes: 8 GPUs x 32 images (RTMDet), 8 x 2 (Mask R-CNN).
    "rtmdet-ins-tiny": ArchSpec("rtmdet/rtmdet-ins_tiny_8xb32-300e_coco.py", 640, 0.004, 256),
    "rtmdet-ins-s": ArchSpec("rtmdet/rtmdet-ins_s_8xb32-300e_coco.py", 640, 0.004, 256),
    "mask-rcnn-r50": ArchSpec("mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py", 800, 0.02, 16),
}

_SIZE_KEYS = ("scale", "img_scale", "crop_size", "size")


def resolve_arch(arch: str, annotations: Path) -> str:
    """The architecture "auto" stands for on this training set: sam-prompt where a typical image holds a few objects
    (natural photos: people, cars), sam-det where it holds many small ones (cells, nuclei), the figures of
    benchmarks/learning_curve.py on ../shared/data (README, "What the first useful model needs")."""
    if arch != AUTO:
        return arch
    import statistics

    from appliance.models.detection.dataset_stats import objects_per_image

    counts = objects_per_image(annotations)
    typical = statistics.median(counts) if counts else 0
    return SAM_DET if typical > DENSE_OBJECTS else SAM_PROMPT


def bundled_config_path(arch: str) -> Path:
    import mmdet

    spec = arch_spec(arch)
    if spec.config is None:
        raise ValueError(f"{arch} has no bundled MMDetection config")
    return Path(mmdet.__file__).parent / ".mim" / "configs" / spec.config


def arch_spec(arch: str) -> ArchSpec:
    try:
        return ARCHS[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHS)}") from None


def build_config(
    arch: str,
    classes: list[str],
    work_dir: Path,
    dataset_dir: Path | None = None,
    epochs: int = 30,
    batch_size: int = 4,
    lr: float | None = None,
    img_size: int | None = None,
    num_workers: int = 0,
    load_from: Path | None = None,
    embedding_store: Path | None = None,
    embedding_store_mb: int = 2048,
    sam_model_type: str = "vit_t",
    sam_checkpoint: Path | None = None,
) -> Any:
    """A training + inference Config for `arch`.

    dataset_dir holds annotations.json (COCO, category names == classes) and
    images/. img_size is the training/inference square size (default: the
    architecture's own, 640 for RTMDet; sam-det always works in SAM's 1024
    frame). lr defaults to the architecture's recipe rate scaled linearly to
    batch_size, the batch actually used. sam-det reads and writes image
    embeddings in embedding_store (a folder; None: computed every time).
    """
    from mmengine.config import Config

    if not classes:
        raise ValueError("need at least one class")
    spec = arch_spec(arch)
    if arch in SAM_ARCHS:
        from appliance.models.detection.samdet import config as samdet_config

        checkpoint = str(sam_checkpoint) if sam_checkpoint else None
        cfg = Config(samdet_config.base(len(classes), embedding_store, embedding_store_mb, sam_model_type,
                                        checkpoint, prompted=arch == SAM_PROMPT))
        dataset_type = "SamEmbeddingCocoDataset"
        if arch == SAM_PROMPT and dataset_dir is not None:
            cfg.model.test_cfg.peaks = samdet_config.peaks_for(Path(dataset_dir) / "annotations.json")
    else:
        cfg = Config.fromfile(str(bundled_config_path(arch)))
        compat.fix_config(cfg)
        _set_num_classes(cfg.model, len(classes))
        size = img_size or spec.base_size
        _rescale_pipelines(cfg, size / spec.base_size)
        dataset_type = "CocoDataset"
    _set_data(cfg, classes, dataset_dir, batch_size, num_workers, dataset_type)
    _set_schedule(cfg, spec, epochs, batch_size, lr)
    cfg.work_dir = str(work_dir)
    # mmengine keeps visualizers as process-wide singletons by name: a second run in the same process would reuse
    # the first one, still writing into the first run's (deleted) work dir.
    cfg.visualizer.name = f"visualizer-{Path(work_dir).name}"
    cfg.load_from = str(load_from) if load_from else None
    cfg.resume = False
    cfg.arch = arch
    cfg.classes = list(classes)
    return cfg


def _set_num_classes(node: Any, n: int) -> None:
    if isinstance(node, dict):
        if "num_classes" in node:
            node["num_classes"] = n
        for value in node.values():
            _set_num_classes(value, n)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _set_num_classes(value, n)


def _rescale(pipeline: list, factor: float) -> list:
    for step in pipeline:
        if step["type"] == "LoadAnnotations" and step.get("with_mask"):
            # poly2mask=False drops RLE masks (brush labels); bitmaps take both.
            step["poly2mask"] = True
        for key in _SIZE_KEYS:
            value = step.get(key)
            if isinstance(value, (tuple, list)) and all(isinstance(v, (int, float)) for v in value):
                step[key] = tuple(max(32, int(round(v * factor))) for v in value)
    return pipeline


def _rescale_pipelines(cfg: Any, factor: float) -> None:
    cfg.train_pipeline = _rescale(cfg.train_pipeline, factor)
    cfg.test_pipeline = _rescale(cfg.test_pipeline, factor)
    for hook in cfg.get("custom_hooks", []):
        if hook.get("type") == "PipelineSwitchHook":
            hook["switch_pipeline"] = _rescale(hook["switch_pipeline"], factor)
    cfg.test_pipeline = [s for s in cfg.test_pipeline if s["type"] != "LoadAnnotations"]


def _set_data(cfg: Any, classes: list[str], dataset_dir: Path | None,
              batch_size: int, num_workers: int, dataset_type: str = "CocoDataset") -> None:
    dataset = dict(
        type=dataset_type,
        metainfo=dict(classes=tuple(classes)),
        data_root=str(dataset_dir or ""),
        ann_file="annotations.json",
        data_prefix=dict(img="images/"),
        filter_cfg=dict(filter_empty_gt=True, min_size=8),
        pipeline=cfg.train_pipeline,
        backend_args=None,
    )
    cfg.train_dataloader = dict(
        batch_size=batch_size,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=False,
        sampler=dict(type="DefaultSampler", shuffle=True),
        batch_sampler=None,
        dataset=dataset,
    )
    # Inference reads only the pipeline; the Runner gets no val/test loop.
    cfg.test_dataloader = dict(dataset=dict(type=dataset_type, pipeline=cfg.test_pipeline))
    for key in ("val_dataloader", "val_cfg", "val_evaluator", "test_cfg", "test_evaluator"):
        cfg[key] = None


def _set_schedule(cfg: Any, spec: ArchSpec, epochs: int, batch_size: int,
                  lr: float | None) -> None:
    if epochs < 1 or batch_size < 1:
        raise ValueError("epochs and batch_size must be >= 1")
    lr = lr if lr is not None else spec.base_lr * batch_size / spec.base_batch
    cfg.optim_wrapper.optimizer.lr = lr
    cfg.train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=epochs, val_interval=10**9)
    warmup_epochs = max(1, epochs // 10)
    cfg.param_scheduler = [
        dict(type="LinearLR", start_factor=1e-3, by_epoch=True, begin=0,
             end=warmup_epochs, convert_to_iter_based=True),
        dict(type="CosineAnnealingLR", eta_min=lr * 0.05, by_epoch=True,
             begin=epochs // 2, end=epochs, T_max=max(1, epochs - epochs // 2),
             convert_to_iter_based=True),
    ]
    for hook in cfg.get("custom_hooks", []):
        if hook.get("type") == "PipelineSwitchHook":
            # Upstream: last 20 of 300 epochs without mosaic/mixup.
            hook["switch_epoch"] = max(0, epochs - max(1, round(epochs * 0.07)))
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=-1, save_last=False)
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=10)
    cfg.default_hooks.visualization = dict(type="DetVisualizationHook", draw=False)
    cfg.log_processor = dict(type="LogProcessor", window_size=10, by_epoch=True)
    cfg.env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend="nccl"),
                       mp_cfg=dict(mp_start_method="fork", opencv_num_threads=1))
