"""Every adaptation of third-party packages to this environment, in one place.

Call `install()` before importing anything from mmdet. Each patch says why it
exists and when it can be deleted.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import sys
import threading
import types
from pathlib import Path
from typing import Any

_lock = threading.Lock()
_installed = False


def install() -> None:
    """Idempotently apply the runtime patches (safe to call from any thread)."""
    global _installed
    with _lock:
        if _installed:
            return
        _install_mmcv_ext_substitute()
        _installed = True


# --- mmcv-lite has no compiled ops -------------------------------------------
# WHY: we install mmcv-lite (pure Python) because full mmcv has no wheels for
# this torch; every `mmcv.ops` module does `load_ext('_ext', [...])` at import,
# and mmdet imports mmcv.ops for all of its heads, so `import mmdet.models`
# fails on the missing `mmcv._ext`. We register a stand-in `mmcv._ext` whose
# ops used by RTMDet(-Ins) and Mask R-CNN (nms, roi_align) run on
# torchvision.ops (CPU and CUDA); any other op raises a clear error when
# *called*, not at import.
# WHEN TO REMOVE: when a full mmcv build (with `mmcv._ext`) is installed; this
# is then a no-op because the real extension imports.

class _MissingExt(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)

        def missing(*args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError(
                f"mmcv op '{name}' needs compiled mmcv; mmcv-lite only has the "
                "torchvision-backed substitutes in appliance.compat")

        return missing


def _ext_nms(boxes, scores, iou_threshold: float, offset: int = 0):
    import torchvision

    if offset:  # legacy "+1" box convention
        boxes = boxes.clone()
        boxes[:, 2:] += offset
    return torchvision.ops.nms(boxes.float(), scores.float(), float(iou_threshold))


def _tv_roi_align(input, rois, height: int, width: int, spatial_scale: float,
                  sampling_ratio: int, pool_mode: int, aligned: bool):
    import torchvision

    if pool_mode == 0:
        raise NotImplementedError("RoIAlign pool_mode='max' needs compiled mmcv")
    return torchvision.ops.roi_align(input, rois.to(input.dtype), (height, width),
                                     spatial_scale, sampling_ratio, aligned)


def _ext_roi_align_forward(input, rois, output, argmax_y, argmax_x, *,
                           aligned_height: int, aligned_width: int,
                           spatial_scale: float, sampling_ratio: int,
                           pool_mode: int, aligned: bool) -> None:
    output.copy_(_tv_roi_align(input, rois, aligned_height, aligned_width,
                               spatial_scale, sampling_ratio, pool_mode, aligned))


def _ext_roi_align_backward(grad_output, rois, argmax_y, argmax_x, grad_input, *,
                            aligned_height: int, aligned_width: int,
                            spatial_scale: float, sampling_ratio: int,
                            pool_mode: int, aligned: bool) -> None:
    import torch

    # RoIAlign is linear in its input, so the vector-Jacobian product does not
    # depend on the input values: differentiate torchvision's op at zeros.
    with torch.enable_grad():
        probe = torch.zeros_like(grad_input, requires_grad=True)
        out = _tv_roi_align(probe, rois, aligned_height, aligned_width,
                            spatial_scale, sampling_ratio, pool_mode, aligned)
        (grad,) = torch.autograd.grad(out, probe, grad_output)
    grad_input.copy_(grad)


def _install_mmcv_ext_substitute() -> None:
    try:
        importlib.import_module("mmcv._ext")
        return  # real compiled ops available
    except ImportError:
        pass
    if "mmcv.ops" in sys.modules:
        raise RuntimeError("appliance.compat.install() must run before mmcv.ops is imported")
    ext = _MissingExt("mmcv._ext")
    ext.__file__ = __file__
    # loader=None: mmengine's mmcv_full_available() then reports "not full mmcv".
    ext.__spec__ = importlib.machinery.ModuleSpec("mmcv._ext", loader=None)
    ext.nms = _ext_nms
    ext.roi_align_forward = _ext_roi_align_forward
    ext.roi_align_backward = _ext_roi_align_backward
    sys.modules["mmcv._ext"] = ext


# --- checkpoints written by mmengine --------------------------------------------
# WHY: torch >= 2.6 defaults torch.load(weights_only=True), which refuses the
# pickled mmengine objects (HistoryBuffer, numpy scalars) in a Runner
# checkpoint. Our registry stores plain state dicts (loadable with
# weights_only=True), so this is only needed to read a Runner checkpoint that
# we wrote ourselves. Never call it on files from elsewhere.
# WHEN TO REMOVE: when mmengine saves weights_only-compatible checkpoints.

def load_trusted_checkpoint(path: Path, map_location: str = "cpu") -> dict:
    import torch

    return torch.load(path, map_location=map_location, weights_only=False)


# --- bundled mmdet configs ------------------------------------------------------
# WHY: the bundled configs are written for 8-GPU COCO training from ImageNet
# weights. Here there is no network (Pretrained init_cfg / load_from URLs
# would try to download), usually no distributed group (SyncBN), and small
# images of arbitrary size.
# WHEN TO REMOVE: never entirely; it is the adaptation of upstream configs.

def is_url(value: Any) -> bool:
    return isinstance(value, str) and "://" in value


def strip_pretrained(node: Any) -> Any:
    """Remove Pretrained init_cfgs pointing at URLs, recursively (in place)."""
    if isinstance(node, dict):
        init_cfg = node.get("init_cfg")
        if isinstance(init_cfg, dict) and init_cfg.get("type") == "Pretrained" \
                and is_url(init_cfg.get("checkpoint")):
            node["init_cfg"] = None
        for value in node.values():
            strip_pretrained(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            strip_pretrained(value)
    return node


def replace_sync_bn(node: Any) -> Any:
    """SyncBN -> BN (in place): single process; SyncBN needs a process group."""
    if isinstance(node, dict):
        if node.get("type") == "SyncBN":
            node["type"] = "BN"
        for value in node.values():
            replace_sync_bn(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            replace_sync_bn(value)
    return node


def fix_config(cfg: Any) -> Any:
    """Apply all environment fixes to an mmengine Config (in place)."""
    strip_pretrained(cfg.model)
    replace_sync_bn(cfg.model)
    for key in ("load_from", "checkpoint"):  # "checkpoint": a variable of the RTMDet configs
        if is_url(cfg.get(key)):
            cfg[key] = None
    pre = cfg.model.setdefault("data_preprocessor", {})
    # Arbitrary image sizes: the FPN strides need inputs padded to /32.
    pre["pad_size_divisor"] = 32
    # LSJ batch augments assume 1024px inputs; they break on small images.
    pre["batch_augments"] = None
    if "RTMDetIns" in str(cfg.model.get("bbox_head", {}).get("type", "")):
        # RTMDet-Ins computes the mask loss on the padded batch shape.
        pre["pad_mask"] = True
    return cfg


# --- deterministic training -------------------------------------------------------
# WHY: a training run is seeded with mmengine's randomness=dict(seed, deterministic=True), which calls
# torch.use_deterministic_algorithms(True). On CUDA, cuBLAS then refuses to run unless this workspace setting is
# in the environment before the first cuBLAS call (CPU runs ignore it).
# WHEN TO REMOVE: when torch no longer needs CUBLAS_WORKSPACE_CONFIG for deterministic cuBLAS.

def deterministic_env() -> None:
    import os

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
