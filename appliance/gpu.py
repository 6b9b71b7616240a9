"""Whether the GPU is used, and when it is not, why: torch's CUDA build, the NVIDIA driver, the device.

A visible GPU that torch cannot use (typically a driver older than the bundled CUDA build needs) must not turn into
a silent CPU fallback: the report says why, `appliance status` shows it, and APPLIANCE_DEVICE=cuda stops start-up.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any

# The oldest Linux driver branch each CUDA major release runs on (NVIDIA's CUDA compatibility table; minor-version
# compatibility lets any driver of the major's first branch run later minors).
MIN_DRIVER = {13: 580, 12: 525, 11: 450}
DRIVER_FILE = Path("/proc/driver/nvidia/version")


def driver_version() -> str | None:
    """The loaded NVIDIA kernel driver's version, e.g. "580.65.06" (None: no driver)."""
    try:
        found = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+\.\d+(?:\.\d+)?)", DRIVER_FILE.read_text())
        if found:
            return found.group(1)
    except OSError:
        pass
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10).stdout.strip().splitlines()
            return out[0].strip() if out else None
        except (OSError, subprocess.SubprocessError):
            return None
    return None


def gpu_visible() -> bool:
    """An NVIDIA device node or driver is present (the container was started with --gpus, or the host has one)."""
    return any(Path("/dev").glob("nvidia[0-9]*")) or DRIVER_FILE.exists()


def required_driver(cuda_build: str | None) -> int | None:
    if not cuda_build:
        return None
    return MIN_DRIVER.get(int(cuda_build.split(".")[0]))


def report() -> dict[str, Any]:
    """{"torch", "cuda_build", "driver", "visible", "usable", "device", "why"}: why is None when the GPU is used."""
    import torch

    with warnings.catch_warnings(record=True) as caught:  # torch says why in a warning, e.g. "driver too old"
        warnings.simplefilter("always")
        usable = torch.cuda.is_available()
    info: dict[str, Any] = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "driver": driver_version(),
                            "visible": gpu_visible(), "usable": usable, "device": None, "why": None}
    if usable:
        info["device"] = f"cuda ({torch.cuda.get_device_name(0)})"
        return info
    info["device"] = "cpu"
    info["why"] = _why_not(info, [str(w.message) for w in caught])
    return info


def _why_not(info: dict[str, Any], warned: list[str]) -> str:
    if not info["cuda_build"]:
        return f"this torch ({info['torch']}) is a CPU-only build"
    if not info["visible"]:
        return "no NVIDIA GPU visible (docker run --gpus all, or a GPU node)"
    needed = required_driver(info["cuda_build"])
    driver = info["driver"]
    if needed and driver and int(driver.split(".")[0]) < needed:
        return (f"NVIDIA driver {driver} is too old for torch's CUDA {info['cuda_build']} build: "
                f"install driver {needed} or newer")
    detail = " ".join(warned).strip().splitlines()[0] if warned else "torch.cuda.is_available() is False"
    return f"a GPU is visible but CUDA is unusable: {detail}"


def summary(info: dict[str, Any]) -> str:
    """One line for logs and `appliance status`."""
    driver = f"driver {info['driver']}" if info["driver"] else "no NVIDIA driver"
    build = f"torch {info['torch']} (CUDA {info['cuda_build']})" if info["cuda_build"] else f"torch {info['torch']}"
    line = f"{info['device']}; {build}; {driver}"
    return line + (f"; GPU not used: {info['why']}" if info["why"] else "")


def require_cuda() -> None:
    """APPLIANCE_DEVICE=cuda and no usable CUDA: stop start-up with one line instead of failing in every model."""
    from appliance.settings import ConfigError

    info = report()
    if not info["usable"]:
        raise ConfigError(f"configuration error: APPLIANCE_DEVICE=cuda but {info['why']}. Fix that, or set "
                          f"APPLIANCE_DEVICE=auto (uses the GPU when it can) or cpu.")
