"""Serve whatever the registry's ``current`` points to, and swap to a new version without dropping a request.

A watchdog observer on the registry folder (plus a slow poll, for file systems without inotify) notices a new
``current``. The new model loads beside the old one, then a reference swap under a lock makes it serve; requests
already running keep the model object they started with, so the old one is freed when the last of them ends.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from appliance.models.registry import ModelRegistry

log = logging.getLogger("predict.swap")


@dataclass(frozen=True)
class Serving:
    version: str
    model: Any


class _Changed(FileSystemEventHandler):
    def __init__(self, poke: Callable[[], None]):
        self.poke = poke

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.poke()


class ModelSlot:
    def __init__(self, registry: ModelRegistry, load: Callable[[Any], Any], poll_seconds: float = 10.0):
        self.registry = registry
        self.load = load  # VersionInfo -> model
        self.poll_seconds = poll_seconds
        self.serving: Serving | None = None
        self.error: str | None = None  # why the registry's current version does not serve, for /health
        self.failed: tuple[str, tuple] | None = None  # that version and its files: retried when either changes
        self.loading: str | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._observer = Observer()

    def get(self) -> Serving | None:
        return self.serving  # one attribute read: atomic, no lock needed on the request path

    def start(self) -> None:
        self.registry.root.mkdir(parents=True, exist_ok=True)
        self._observer.schedule(_Changed(self._wake.set), str(self.registry.root), recursive=False)
        self._observer.daemon = True
        self._observer.start()
        threading.Thread(target=self._run, name="model-swap", daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                self.refresh()
            except Exception as error:  # e.g. the registry folder unreadable for a moment: never end the swapping
                log.error("checking the registry failed: %s; trying again", error)
            self._wake.wait(self.poll_seconds)
            self._wake.clear()

    def refresh(self) -> None:
        """Load and serve the registry's current version if it is not the one serving."""
        current = self.registry.current()
        serving = self.serving
        if current is None or (serving and serving.version == current.version):
            return
        files = fingerprint(current.path)
        if self.failed == (current.version, files):
            return
        self.loading = current.version
        try:
            model = self.load(current)
        except Exception as error:  # a broken version never replaces a working one
            log.error("version %s cannot be loaded, still serving %s: %s", current.version,
                      serving.version if serving else "nothing", error)
            self.failed = (current.version, files)
            self.error = (f"version {current.version} failed to load: {error}; fix or replace its files (it is "
                          f"retried when they change) or roll back with `appliance model use`")
            return
        finally:
            self.loading = None
        with self._lock:
            self.serving = Serving(current.version, model)
        self.failed = self.error = None
        log.info("now serving %s (was %s)", current.version, serving.version if serving else "nothing")


def fingerprint(folder: Path) -> tuple:
    """Name, size and modification time of every file of a version: a fixed file changes it."""
    try:
        return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()))
    except OSError:
        return ()
