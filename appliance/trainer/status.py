"""The trainer's status file: what runs now (stage, epoch, loss, time left) and how the last run ended."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

log = logging.getLogger("trainer")


class StatusFile:
    """A write that fails (a full disk, a read-only volume) is reported once and retried with the next update:
    the status is kept in memory meanwhile, so nothing is lost and the trainer never crashes on it."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        self.unsaved: dict | None = None  # the status not yet on disk
        self.write_error: str | None = None

    def read(self) -> dict:
        if self.unsaved is not None:
            return dict(self.unsaved)
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def update(self, **fields) -> dict:
        with self.lock:
            status = {**self.read(), **fields, "updated_at": time.time()}
            try:
                self._write(status)
            except OSError as error:
                self.unsaved = status
                if self.write_error != error.strerror:
                    log.error("cannot write %s (%s): status kept in memory, retried with the next update",
                              self.path, error.strerror)
                self.write_error = error.strerror
                return status
            if self.write_error:
                log.info("%s written again", self.path)
            self.unsaved = self.write_error = None
            return status

    def _write(self, status: dict) -> None:
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(status, indent=2, default=str))
            os.replace(tmp, self.path)  # readers never see half a file
        except OSError:
            tmp.unlink(missing_ok=True)  # half a file on a full disk holds space the next write needs
            raise


def clear_interrupted(trainer_dir: Path) -> str | None:
    """At start nothing trains yet: a status saying "running" and run folders are what a stopped run left behind.
    Returns what was cleaned, in one line, or None."""
    cleaned = []
    runs = trainer_dir / "runs"
    if runs.is_dir() and any(runs.iterdir()):
        shutil.rmtree(runs, ignore_errors=True)
        cleaned.append("its run folders")
    status = StatusFile(trainer_dir / "status.json")
    previous = status.read()
    if previous.get("state") == "running":
        status.update(state="interrupted", stage=None, epoch=None, iter=None, loss=None, eta_s=None,
                      error=f"run {previous.get('run')} was interrupted (the appliance stopped); the next run starts "
                            f"when annotations or a request call for it")
        cleaned.append(f"the status of interrupted run {previous.get('run')}")
    return f"trainer: cleaned {' and '.join(cleaned)}" if cleaned else None
