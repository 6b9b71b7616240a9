"""Requests for a training run (`appliance train`, Label Studio's "Start training"): one file each in the trainer's
request folder, which the trainer watches and empties. Written by the prediction backend and the CLI, read by the
trainer: the folder is their only contact."""

from __future__ import annotations

import json
import time
from pathlib import Path

from appliance.settings import Settings


def requests_dir(settings: Settings) -> Path:
    return settings.trainer_dir / "requests"


def request_run(settings: Settings, reason: str) -> Path:
    """Ask the trainer for a run. Picked up within seconds."""
    folder = requests_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{time.time():.6f}.json"
    path.write_text(json.dumps({"reason": reason, "at": time.time()}))
    return path
