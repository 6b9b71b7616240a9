"""The annotation journal: the folder Label Studio writes every submitted annotation to (a Local Files export
storage, one JSON file per annotation holding the whole task). The trainer watches it and reads tasks from it."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

log = logging.getLogger("trainer.journal")


class JournalWatcher(FileSystemEventHandler):
    """Counts journal files created, changed or deleted since the last ``mark()``; wakes the trainer."""

    def __init__(self, folders: list[Path], wake: threading.Event):
        self.folders = folders
        self.wake = wake
        self.lock = threading.Lock()
        self.changed: set[str] = set()
        self.last_change: float | None = None
        self.observer = Observer()

    def start(self) -> None:
        for folder in self.folders:
            folder.mkdir(parents=True, exist_ok=True)
            self.observer.schedule(self, str(folder), recursive=False)
        self.observer.daemon = True
        self.observer.start()

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type in ("opened", "closed_no_write"):
            return
        path = str(getattr(event, "dest_path", "") or event.src_path)
        with self.lock:
            self.changed.add(path)
            self.last_change = time.time()
        self.wake.set()

    def seed(self, paths: list[Path], last_change: float | None) -> None:
        """Changes made while the trainer was not running."""
        with self.lock:
            self.changed.update(str(p) for p in paths)
            self.last_change = max(filter(None, [self.last_change, last_change]), default=None)

    def pending(self, journal: Path) -> tuple[int, float | None]:
        with self.lock:
            count = sum(1 for p in self.changed if Path(p).parent == journal)
            return count, self.last_change

    def mark(self, journal: Path) -> None:
        with self.lock:
            self.changed = {p for p in self.changed if Path(p).parent != journal}


def changed_since(journal: Path, since: float) -> tuple[list[Path], float | None]:
    files = [p for p in journal.glob("*") if p.is_file() and p.stat().st_mtime > since]
    return files, max((p.stat().st_mtime for p in files), default=None)


def _updated(task: dict) -> str:
    stamps = [a.get("updated_at") or a.get("created_at") or "" for a in task.get("annotations") or []]
    return max(stamps, default="")


def read_tasks(journal: Path) -> list[dict]:
    """The newest snapshot of every task in the journal (files written by Label Studio; bad ones are skipped)."""
    tasks: dict[int, dict] = {}
    for path in sorted(journal.glob("*")):
        if not path.is_file():
            continue
        try:
            task = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            log.warning("journal file %s skipped: %s", path.name, error)
            continue
        if not isinstance(task, dict) or "id" not in task or "annotations" not in task:
            continue  # not a task snapshot (e.g. written before the journal format was set)
        known = tasks.get(task["id"])
        if known is None or _updated(task) >= _updated(known):
            tasks[task["id"]] = task
    return list(tasks.values())
