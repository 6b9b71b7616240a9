"""The model registry shared by several machines: each node keeps its own registry folder, and this one follows the
shared one on GCS.

Shared layout under gs://bucket/prefix/models/:
    versions/v0003-20261130T101500/{config.py, weights.pth, classes.json, metrics.json}
    current                                   (text: the serving version's name)

A version is uploaded whole before ``current`` names it, so a node never follows the pointer to half a model.
Readers (the prediction backends, the trainer, `appliance status`) call ``current()``: at most every
APPLIANCE_SHARED_POLL_SECONDS it reads the pointer, downloads a version this node lacks into its own registry
(complete, then renamed in) and points the local ``current`` at it; the local hot-swap does the rest. Writers
(`publish`, `use`, `prune`) change the shared registry as well; publishing runs under the training lock, so version
numbers are unique across machines. When GCS cannot be reached, a node keeps serving what it has.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from pathlib import Path

from google.api_core import exceptions as api
from requests import RequestException

from appliance.models.registry import _NAME, REQUIRED_FILES, ModelRegistry, UnknownVersionError, VersionInfo
from appliance.settings import Settings
from appliance.shared.bucket import RETRY, TIMEOUT, SharedBucket

log = logging.getLogger("shared.registry")
UNREACHABLE = (api.GoogleAPICallError, api.RetryError, RequestException, OSError)


def open_registry(settings: Settings) -> ModelRegistry:
    """This node's registry: following the shared one when APPLIANCE_SHARED_STATE is set."""
    if settings.shared_state:
        return SharedRegistry(settings.models_dir, SharedBucket(settings), settings.shared_poll_seconds)
    return ModelRegistry(settings.models_dir)


class SharedRegistry(ModelRegistry):
    def __init__(self, root: Path, shared: SharedBucket, poll_seconds: float):
        super().__init__(root)
        self.shared = shared
        self.poll_seconds = poll_seconds
        self.error: str | None = None  # why the shared registry could not be read last time
        self._pulled_at = float("-inf")
        self._pull_lock = threading.Lock()

    # --- readers --------------------------------------------------------------------------------
    def current(self) -> VersionInfo | None:
        self.pull()
        return super().current()

    def list(self) -> list[VersionInfo]:
        self.pull(force=True)
        return super().list()

    def pull(self, force: bool = False) -> str | None:
        """Follow the shared ``current``; returns the version it names (None: none yet or unreachable)."""
        with self._pull_lock:
            if not force and time.monotonic() - self._pulled_at < self.poll_seconds:
                return None
            self._pulled_at = time.monotonic()
            try:
                name = self.remote_current()
                if name and name != self._current_name():
                    self._fetch(name)
                    ModelRegistry.use(self, name)
                    log.info("following %s/models: now %s", self.shared.url, name)
            except UNREACHABLE as error:
                self.error = f"shared registry {self.shared.url} unreachable: {_short(error)}"
                log.warning("%s; keeping this node's current version", self.error)
                return None
            except UnknownVersionError as error:  # a pointer to an incomplete version: someone's manual edit
                self.error = str(error)
                log.error("%s; keeping this node's current version", error)
                return None
            self.error = None
            return name

    def remote_current(self) -> str | None:
        try:
            name = self.shared.blob("models/current").download_as_text(timeout=TIMEOUT, retry=RETRY).strip()
        except api.NotFound:
            return None
        return name if _NAME.match(name) else None

    def remote_versions(self) -> list[str]:
        names = {self.shared.relative(b).split("/")[2] for b in self.shared.list("models/versions")}
        return sorted((n for n in names if _NAME.match(n)), key=lambda n: int(_NAME.match(n).group(1)))

    # --- writers --------------------------------------------------------------------------------
    def publish(self, src_dir: Path, metrics: dict | None = None, make_current: bool = True) -> str:
        version = super().publish(src_dir, metrics, make_current=False)
        self._upload(version)
        if make_current:
            self._point(version)
            ModelRegistry.use(self, version)
        return version

    def use(self, version: str) -> VersionInfo:
        if not (self.versions_dir / version).is_dir() and version in self.remote_versions():
            self._fetch(version)
        info = ModelRegistry.use(self, version)
        if version not in self.remote_versions():
            self._upload(version)  # e.g. `appliance model import` on this node
        self._point(version)
        return info

    def prune(self, keep: int) -> list[str]:
        doomed = super().prune(keep)
        names, current = self.remote_versions(), self.remote_current()
        for name in [n for n in names[:max(0, len(names) - keep)] if n != current]:
            for blob in self.shared.list(f"models/versions/{name}"):
                blob.delete(timeout=TIMEOUT, retry=RETRY)
        return doomed

    # --- internals ------------------------------------------------------------------------------
    def _next_name(self) -> str:
        """Above every version here and in the shared registry (another node published the others)."""
        name = super()._next_name()
        remote = self.remote_versions()
        if remote and int(_NAME.match(remote[-1]).group(1)) >= int(_NAME.match(name).group(1)):
            number = int(_NAME.match(remote[-1]).group(1)) + 1
            name = f"v{number:04d}-{_NAME.match(name).group(2)}"
        return name

    def _point(self, version: str) -> None:
        self.shared.blob("models/current").upload_from_string(version, content_type="text/plain", timeout=TIMEOUT,
                                                              retry=RETRY)

    def _upload(self, version: str) -> None:
        for path in sorted(self.path(version).iterdir()):
            if path.is_file():
                self.shared.blob(f"models/versions/{version}/{path.name}").upload_from_filename(
                    str(path), timeout=(TIMEOUT[0], 600), retry=RETRY)

    def _fetch(self, version: str) -> None:
        """Download a shared version into this registry: complete in a temp folder, then renamed in."""
        if (self.versions_dir / version).is_dir():
            return
        blobs = self.shared.list(f"models/versions/{version}")
        names = {self.shared.relative(b).rsplit("/", 1)[1] for b in blobs}
        missing = [f for f in REQUIRED_FILES if f not in names]
        if missing:
            raise UnknownVersionError(f"shared version {version} lacks {', '.join(missing)}")
        temp = self.versions_dir / f".tmp-{uuid.uuid4().hex}"
        temp.mkdir()
        try:
            for blob in blobs:
                blob.download_to_filename(str(temp / self.shared.relative(blob).rsplit("/", 1)[1]),
                                          timeout=(TIMEOUT[0], 600), retry=RETRY)
            with self._locked():
                if not (self.versions_dir / version).is_dir():
                    temp.rename(self.versions_dir / version)
        finally:
            shutil.rmtree(temp, ignore_errors=True)


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:120]}" if text else type(error).__name__
