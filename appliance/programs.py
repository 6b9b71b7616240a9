"""The command line and environment of every supervised program, built from the settings in one place."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from appliance import studio
from appliance.settings import Settings

PROGRAMS = ("studio", "sam", "predict", "train", "bootstrap")
BIN = Path(sys.executable).parent


def process_env(settings: Settings) -> dict[str, str]:
    """What every child inherits: the user's environment with resolved paths and sane thread settings."""
    env = dict(os.environ)
    env["APPLIANCE_DATA_DIR"] = str(settings.data)
    env["PYTHONUNBUFFERED"] = "1"
    # OpenMP busy-waiting makes several model processes on few cores up to 10x slower.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("OMP_NUM_THREADS", str(settings.torch_threads))
    env.setdefault("MKL_NUM_THREADS", str(settings.torch_threads))
    return env


def backend_command(settings: Settings, app: str, port: int) -> list[str]:
    # One worker: one model in memory. Threads serve I/O and /health while the model computes.
    return [
        str(BIN / "gunicorn"), "--bind", f"{settings.backend_host}:{port}", "--workers", "1",
        "--threads", str(settings.backend_threads), "--timeout", "300", "--graceful-timeout", "20",
        "--no-control-socket", "--config", "python:appliance.backends.gunicorn_conf",
        "--log-level", settings.log_level.lower(), app,
    ]


def command(name: str, settings: Settings) -> tuple[list[str], dict[str, str]]:
    env = process_env(settings)
    if name == "studio":
        return studio.gunicorn_command(settings), {**env, **studio.studio_env(settings)}
    if name == "sam":
        return backend_command(settings, "appliance.backends.sam:create_app()", settings.sam_port), env
    if name == "predict":
        return backend_command(settings, "appliance.backends.predict:create_app()", settings.predict_port), env
    if name == "train":
        return [sys.executable, "-m", "appliance", "trainer"], env
    if name == "bootstrap":
        return [sys.executable, "-m", "appliance", "bootstrap"], env
    raise ValueError(f"unknown program {name!r}; one of {', '.join(PROGRAMS)}")
