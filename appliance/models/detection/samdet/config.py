"""The MMDetection config of sam-det (written here: MMDetection ships no config for a SAM backbone)."""

from __future__ import annotations

from pathlib import Path

# Box head on the pyramid: RTMDet's (anchor-free, dynamic soft label assignment), light enough for a CPU:
# strides 16 and 32, 64 channels, one conv per branch train a batch of 4 in ~0.4 s on one core (stride 8 and
# 96 channels: ~4 s).
FEAT_CHANNELS = 64
STRIDES = (16, 32)
STACKED_CONVS = 1
META_KEYS = ("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")


def model(num_classes: int, sam_model_type: str = "vit_t", sam_checkpoint: str | None = None) -> dict:
    sam = dict(model_type=sam_model_type, checkpoint=sam_checkpoint)
    return dict(
        type="SamDetector",
        data_preprocessor=dict(type="SamEmbeddingPreprocessor"),
        backbone=dict(type="SamImageEncoder", **sam),
        neck=dict(type="SamSimpleFPN", in_channels=256, out_channels=FEAT_CHANNELS,
                  scales=tuple(16 / s for s in STRIDES)),
        bbox_head=dict(
            type="RTMDetSepBNHead", num_classes=num_classes, in_channels=FEAT_CHANNELS, stacked_convs=STACKED_CONVS,
            feat_channels=FEAT_CHANNELS, use_depthwise=False, share_conv=True, pred_kernel_size=1,
            anchor_generator=dict(type="MlvlPointGenerator", offset=0, strides=list(STRIDES)),
            bbox_coder=dict(type="DistancePointBBoxCoder"),
            loss_cls=dict(type="QualityFocalLoss", use_sigmoid=True, beta=2.0, loss_weight=1.0),
            loss_bbox=dict(type="GIoULoss", loss_weight=2.0),
            with_objectness=False, exp_on_reg=False,
            norm_cfg=dict(type="BN"), act_cfg=dict(type="SiLU", inplace=True)),
        sam=sam,
        train_cfg=dict(assigner=dict(type="DynamicSoftLabelAssigner", topk=13), allowed_border=-1, pos_weight=-1,
                       debug=False),
        # mask_score_thr: boxes scoring less than it (or than the threshold asked, when higher) get no SAM decoder
        # pass (~0.06 s each on 2 CPU cores) and are dropped (see SamDetector.predict). The held-out scoring
        # asks at holdout.EVAL_THRESHOLD (0.1), so the trainer can choose a threshold down to it; serving asks at
        # the version's thresholds, so only what is shown is decoded.
        test_cfg=dict(nms_pre=2000, min_bbox_size=0, score_thr=0.05, nms=dict(type="nms", iou_threshold=0.6),
                      max_per_img=200, mask_score_thr=0.1),
    )


def prompted_model(num_classes: int, sam_model_type: str = "vit_t", sam_checkpoint: str | None = None) -> dict:
    """sam-prompt (samdet/prompted.py): SAM's masks prompted at a class heat map's peaks, scored by an MLP."""
    sam = dict(model_type=sam_model_type, checkpoint=sam_checkpoint)
    return dict(
        type="SamPromptDetector", num_classes=num_classes,
        data_preprocessor=dict(type="SamEmbeddingPreprocessor"),
        backbone=dict(type="SamImageEncoder", **sam), sam=sam, hidden=64, train_grid=4,
        # peaks: SAM decoder passes per image (~0.06 s each on 2 CPU cores, three candidate masks each).
        test_cfg=dict(peaks=32, peak_thr=0.1, score_thr=0.05, nms_iou=0.5, max_per_img=100),
    )


def peaks_for(annotations: Path) -> int:
    """sam-prompt's prompts per image: twice the objects of a busy training image (its 90th percentile), 24 to 128
    (each costs a SAM decoder pass, ~0.06 s on 2 CPU cores). Twice as many find more people but cost the annotator
    more (coco-ccby person, N=20: 48 peaks segm AP50 0.436 against 26's 0.397, found 114/221 against 97; on another
    model 52 peaks cost 1491 actions against 26's 1479: the extra candidates raise the threshold tuned on 10 photos)."""
    import numpy as np

    from appliance.models.detection.dataset_stats import objects_per_image

    counts = objects_per_image(annotations)
    busy = float(np.percentile(counts, 90)) if counts else 0.0
    return int(min(128, max(24, round(2 * busy))))


def pipelines(store_dir: Path | None, store_mb: int, sam_model_type: str = "vit_t",
              sam_checkpoint: str | None = None, with_mask: bool = False) -> tuple[list, list]:
    embed = dict(type="LoadSamEmbedding", store_dir=str(store_dir) if store_dir else None, store_mb=store_mb,
                 model_type=sam_model_type, checkpoint=sam_checkpoint)
    pack = dict(type="PackDetInputs", meta_keys=META_KEYS)
    load = dict(type="LoadAnnotations", with_bbox=True, with_mask=with_mask, poly2mask=True)
    # Masks load at the image's own size (ori_shape, set by LoadSamEmbedding); boxes load first, to be rescaled.
    train = [embed, load, pack] if with_mask else [load, embed, pack]
    # The first step is replaced by LoadImageFromNDArray for in-memory images (model.Detector).
    test = [dict(type="LoadImageFromFile"), embed, pack]
    return train, test


def base(num_classes: int, store_dir: Path | None, store_mb: int, sam_model_type: str = "vit_t",
         sam_checkpoint: str | None = None, prompted: bool = False) -> dict:
    """Everything but data roots and the schedule (configs.build_config fills those in). prompted: sam-prompt's
    model (trained on the masks) instead of sam-det's box head."""
    train_pipeline, test_pipeline = pipelines(store_dir, store_mb, sam_model_type, sam_checkpoint, prompted)
    build = prompted_model if prompted else model
    return dict(
        default_scope="mmdet",
        custom_imports=dict(imports=["appliance.models.detection.samdet"], allow_failed_imports=False),
        model=build(num_classes, sam_model_type, sam_checkpoint),
        train_pipeline=train_pipeline,
        test_pipeline=test_pipeline,
        # AdamW on the neck and head (the frozen SAM parts get no gradient). The rate is set per run
        # (configs._set_schedule).
        optim_wrapper=dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=1e-3, weight_decay=0.05)),
        default_hooks=dict(timer=dict(type="IterTimerHook"), param_scheduler=dict(type="ParamSchedulerHook"),
                           sampler_seed=dict(type="DistSamplerSeedHook")),
        custom_hooks=[],
        visualizer=dict(type="DetLocalVisualizer", vis_backends=[dict(type="LocalVisBackend")], name="visualizer"),
        log_level="WARNING",
    )
