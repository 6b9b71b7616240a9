"""SAM image embeddings shared by several machines: gs://bucket/prefix/embeddings/<model type>-<content key>.npy.

A tier behind each node's bounded embedding store (appliance.models.sam.store): a miss there is looked up here
before the encoder runs, and every embedding a node computes is uploaded in the background (never holding up a
click). So an image is encoded once across the SAM pods, the trainer and the predictors. The objects are written once
(``if_generation_match=0``) and never change; give the bucket a lifecycle rule to expire old ones.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from google.api_core import exceptions as api

from appliance.settings import Settings
from appliance.shared.bucket import RETRY, TIMEOUT, SharedBucket
from appliance.shared.registry import UNREACHABLE, _short

log = logging.getLogger("shared.embeddings")
FOLDER = "embeddings"


class SharedEmbeddings:
    def __init__(self, shared: SharedBucket):
        self.shared = shared
        self._uploads = ThreadPoolExecutor(max_workers=2, thread_name_prefix="embedding-upload")
        self._pending: set[Future] = set()
        self._lock = threading.Lock()
        self.error: str | None = None

    def fetch(self, name: str, dest: Path) -> bool:
        """Download ``name`` to ``dest``; False when it is not shared (yet) or GCS cannot be reached."""
        try:
            self.shared.blob(f"{FOLDER}/{name}").download_to_filename(str(dest), timeout=TIMEOUT, retry=RETRY)
        except api.NotFound:
            Path(dest).unlink(missing_ok=True)
            return False
        except UNREACHABLE as error:
            Path(dest).unlink(missing_ok=True)
            self._warn(error)
            return False
        return True

    def upload(self, name: str, data: bytes) -> None:
        """Share an embedding in the background (a copy of the bytes: the local file may be trimmed meanwhile)."""
        future = self._uploads.submit(self._upload, name, data)
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._done)

    def flush(self, timeout: float = 60) -> None:
        """Wait for the uploads in flight (tests, shutdown)."""
        with self._lock:
            pending = list(self._pending)
        for future in pending:
            future.result(timeout)

    def _upload(self, name: str, data: bytes) -> None:
        try:
            self.shared.blob(f"{FOLDER}/{name}").upload_from_string(data, content_type="application/octet-stream",
                                                                    if_generation_match=0, timeout=TIMEOUT)
        except api.PreconditionFailed:
            pass  # another machine shared the same image's embedding first: identical content
        except UNREACHABLE as error:
            self._warn(error)

    def _done(self, future: Future) -> None:
        with self._lock:
            self._pending.discard(future)

    def _warn(self, error: BaseException) -> None:
        if self.error is None:
            log.warning("shared embeddings %s/%s unreachable: %s; encoding locally", self.shared.url, FOLDER,
                        _short(error))
        self.error = _short(error)


def shared_embeddings(settings: Settings) -> SharedEmbeddings | None:
    return SharedEmbeddings(SharedBucket(settings)) if settings.shared_state else None


def from_environment() -> SharedEmbeddings | None:
    """The training job's tier (``models.sam.store.use_remote_tier``): the process's settings, from its environment."""
    if not os.environ.get("APPLIANCE_SHARED_STATE"):
        return None
    from appliance.settings import load_settings

    return shared_embeddings(load_settings())
