"""The trainer process: a watchdog observer on the annotation journal.

For now it keeps count of the annotations that arrived since start; the training loop builds on this.
"""

from __future__ import annotations

import logging
import threading

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from appliance.settings import Settings

log = logging.getLogger("trainer")


class JournalHandler(FileSystemEventHandler):
    def __init__(self):
        self.changed: set[str] = set()
        self.lock = threading.Lock()

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type not in ("created", "modified", "moved"):
            return
        path = getattr(event, "dest_path", None) or event.src_path
        with self.lock:
            self.changed.add(str(path))


def serve(settings: Settings, stop: threading.Event | None = None) -> None:
    stop = stop or threading.Event()
    handler = JournalHandler()
    observer = Observer()
    settings.journal_dir.mkdir(parents=True, exist_ok=True)
    observer.schedule(handler, str(settings.journal_dir), recursive=True)
    observer.start()
    log.info("watching %s for submitted annotations", settings.journal_dir)
    seen = 0
    try:
        while not stop.wait(5):
            with handler.lock:
                count = len(handler.changed)
            if count != seen:
                log.info("%d annotation file(s) changed since start", count)
                seen = count
    finally:
        observer.stop()
        observer.join()
