"""SAM's image encoder on ONNX Runtime: the same weights exported once, about a third faster on a CPU.

The export is keyed by the checkpoint's sha256, the model type and the torch release. The install exports the
bundled MobileSAM's encoder into the venv (``INSTALLED_DIR``, so the image and a native install ship it); any other
checkpoint is exported on first start into the data volume's cache, so a restart loads it in a second. Its features
equal PyTorch's to float error (1e-6), so embeddings stored by one engine are read by the other unchanged.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from .weights import file_sha256

log = logging.getLogger("sam.onnx")

OPSET = 17
INSTALLED_DIR = Path(sys.prefix) / "share" / "appliance" / "onnx"  # written by `appliance export-onnx` at install


class OnnxEncoder:
    """Runs an exported image encoder: 1x3xSxS normalised, padded pixels in, 1x256x64x64 features out."""

    name = "onnxruntime"

    def __init__(self, path: Path, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        # Busy-waiting threads starve the other processes sharing a small CPU (as OMP_WAIT_POLICY=PASSIVE for torch).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # ORT's arena keeps the encoder's largest activations (~300 MB) for good; without it an idle backend gives
        # them back, at no measurable cost per encode.
        options.enable_cpu_mem_arena = False
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(pixels.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


def cache_path(cache_dir: Path, checkpoint: Path, model_type: str) -> Path:
    """Where the export of ``checkpoint`` lives: one file per checkpoint content, model type and torch release."""
    digest = file_sha256(checkpoint)[:16]
    return Path(cache_dir) / f"sam-{model_type}-{digest}-torch{torch.__version__.split('+')[0]}-encoder.onnx"


def export(image_encoder: torch.nn.Module, image_size: int, path: Path) -> Path:
    """Export ``image_encoder`` to ``path`` atomically (processes exporting at once each write a whole file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros(1, 3, image_size, image_size)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about Python-side shape checks in the encoder
            torch.onnx.export(image_encoder, (dummy,), tmp, dynamo=False, opset_version=OPSET,
                              input_names=["pixels"], output_names=["features"])
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from a service running as another user
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_or_export(image_encoder: torch.nn.Module, image_size: int, checkpoint: Path, model_type: str,
                   cache_dir: Path | None, threads: int = 1) -> OnnxEncoder:
    """The installed or cached export of this checkpoint's encoder, exported into ``cache_dir`` when there is none
    (with ``cache_dir`` None, only the installed export: FileNotFoundError without one)."""
    installed = cache_path(INSTALLED_DIR, checkpoint, model_type)
    if installed.is_file():
        return OnnxEncoder(installed, threads)
    if cache_dir is None:
        raise FileNotFoundError(f"no installed ONNX export of {checkpoint} ({installed})")
    path = cache_path(cache_dir, checkpoint, model_type)
    if not path.is_file():
        log.info("exporting the SAM image encoder to ONNX (once per checkpoint): %s", path.name)
        export(copy.deepcopy(image_encoder), image_size, path)  # a copy: clicks keep encoding with the original
    try:
        return OnnxEncoder(path, threads)
    except Exception:
        path.unlink(missing_ok=True)  # a damaged cache file: the next start exports again
        raise
