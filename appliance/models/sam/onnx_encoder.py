"""SAM's image encoder exported to ONNX once, run by a CPU inference engine: OpenVINO (MobileSAM: 0.5 s an image on
2 cores, PyTorch 1.3 s) or ONNX Runtime (0.75 s), both from PyPI and reading the same export.

The export is keyed by the checkpoint's sha256, the model type and the torch release. The install exports the
bundled MobileSAM's encoder into the venv (``INSTALLED_DIR``, so the image and a native install ship it); any other
checkpoint is exported on first start into the data volume's cache, so a restart loads it in a second. Features equal
PyTorch's to float error (1e-5), so embeddings stored by one engine are read by the others unchanged.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from .weights import file_sha256

log = logging.getLogger("sam.onnx")

OPSET = 17
INSTALLED_DIR = Path(sys.prefix) / "share" / "appliance" / "onnx"  # written by `appliance export-onnx` at install


RUNTIMES = ("openvino", "onnxruntime")  # "auto" takes the first one installed


class OnnxEncoder:
    """Runs an exported image encoder on ONNX Runtime: 1x3xSxS normalised, padded pixels in, 1x256x64x64 out."""

    name = "onnxruntime"

    def __init__(self, path: Path, threads: int = 1) -> None:
        self.path = path
        self.session = ort_session(path, threads)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(pixels.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


def ort_session(path: Path, threads: int = 1):
    """An ONNX Runtime CPU session on ``threads`` threads that shares a small CPU well."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    # Busy-waiting threads starve the other processes sharing a small CPU (as OMP_WAIT_POLICY=PASSIVE for torch).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # ORT's arena keeps a model's largest activations (the encoder's ~300 MB) for good; without it an idle backend
    # gives them back, at no measurable cost per encode.
    options.enable_cpu_mem_arena = False
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OpenVinoEncoder:
    """The same export on OpenVINO's CPU plugin, in float32 (its default on CPUs with bf16 would change the masks)."""

    name = "openvino"

    def __init__(self, path: Path, threads: int = 1) -> None:
        import openvino as ov

        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": max(1, threads),
                  "INFERENCE_PRECISION_HINT": "f32"}
        self.path = path
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self._lock = threading.Lock()  # one infer request: one image at a time

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(pixels.detach().cpu().numpy(), dtype=np.float32)
        with self._lock:
            output = self.request.infer([array])[0]
            return torch.from_numpy(np.array(output, copy=True))  # the request reuses its output buffer


def open_encoder(path: Path, threads: int = 1, runtime: str = "auto"):
    """The export at ``path`` on ``runtime`` ("auto": OpenVINO when installed, else ONNX Runtime)."""
    if runtime not in ("auto", *RUNTIMES):
        raise ValueError(f"unknown encoder runtime {runtime!r}; use auto, {' or '.join(RUNTIMES)}")
    if runtime == "openvino":
        return OpenVinoEncoder(path, threads)
    if runtime == "auto" and _installed("openvino"):
        try:
            return OpenVinoEncoder(path, threads)
        except Exception as error:  # e.g. a CPU OpenVINO does not support: ONNX Runtime reads the same file
            log.warning("OpenVINO could not load the SAM encoder (%s); using ONNX Runtime", str(error).splitlines()[0])
    return OnnxEncoder(path, threads)


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def cache_path(cache_dir: Path, checkpoint: Path, model_type: str, part: str = "encoder") -> Path:
    """Where the export of ``checkpoint``'s ``part`` lives: one file per checkpoint content, model type, torch
    release and part (the image encoder, or prompt_decoder.PART)."""
    digest = file_sha256(checkpoint)[:16]
    return Path(cache_dir) / f"sam-{model_type}-{digest}-torch{torch.__version__.split('+')[0]}-{part}.onnx"


def export(image_encoder: torch.nn.Module, image_size: int, path: Path) -> Path:
    """Export ``image_encoder`` to ``path`` atomically (processes exporting at once each write a whole file)."""
    dummy = torch.zeros(1, 3, image_size, image_size)
    return export_module(image_encoder, (dummy,), path, input_names=["pixels"], output_names=["features"])


def export_module(module: torch.nn.Module, example: tuple, path: Path, input_names: list[str],
                  output_names: list[str], dynamic_axes: dict | None = None) -> Path:
    """Trace ``module`` on ``example`` into an ONNX file at ``path``, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about Python-side shape checks in SAM's code
            torch.onnx.export(module, example, tmp, dynamo=False, opset_version=OPSET, input_names=input_names,
                              output_names=output_names, dynamic_axes=dynamic_axes)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from a service running as another user
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_or_export(image_encoder: torch.nn.Module, image_size: int, checkpoint: Path, model_type: str,
                   cache_dir: Path | None, threads: int = 1, runtime: str = "auto"):
    """The installed or cached export of this checkpoint's encoder on ``runtime``, exported into ``cache_dir`` when
    there is none (with ``cache_dir`` None, only the installed export: FileNotFoundError without one)."""
    installed = cache_path(INSTALLED_DIR, checkpoint, model_type)
    if installed.is_file():
        return open_encoder(installed, threads, runtime)
    if cache_dir is None:
        raise FileNotFoundError(f"no installed ONNX export of {checkpoint} ({installed})")
    path = cache_path(cache_dir, checkpoint, model_type)
    if not path.is_file():
        log.info("exporting the SAM image encoder to ONNX (once per checkpoint): %s", path.name)
        export(copy.deepcopy(image_encoder), image_size, path)  # a copy: clicks keep encoding with the original
    try:
        return open_encoder(path, threads, runtime)
    except Exception:
        if not _readable(path, threads):  # a damaged cache file: the next start exports again
            path.unlink(missing_ok=True)
        raise  # else the file is sound and the runtime is at fault (a forced OpenVINO on an unsupported CPU)


def _readable(path: Path, threads: int) -> bool:
    """Whether ONNX Runtime, the reference reader of the format, loads the export."""
    try:
        OnnxEncoder(path, threads)
    except Exception:
        return False
    return True
