"""The trainer's status file: what runs now (stage, epoch, loss, time left) and how the last run ended."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path


class StatusFile:
    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()

    def read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def update(self, **fields) -> dict:
        with self.lock:
            status = {**self.read(), **fields, "updated_at": time.time()}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(status, indent=2, default=str))
            os.replace(tmp, self.path)  # readers never see half a file
            return status
