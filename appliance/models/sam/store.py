"""Image embeddings on disk, shared by every process: one SAM encoder pass per image, ever.

The SAM backend writes the embedding it computes for a click or a prefetch; the trainer and the prediction backend
read it instead of encoding the image again. Files live in one folder on the data volume
(``<data>/cache/embeddings/<model type>-<content key>.npy``, float32, 256x64x64 for every SAM type), keyed by the
image's bytes (``cache.content_key``) and the SAM model type (two SAM types give different features).

- Writes are atomic (a temporary file in the same folder, then ``os.replace``): a reader sees a whole file or none.
- The folder is bounded in bytes: after a write, the least recently used files (by mtime, which a read refreshes)
  are deleted until the total fits. A file deleted under a reader is simply a miss.
- Nothing here is authoritative: the folder is a cache, safe to delete at any time.
- With ``remote`` (appliance.shared.embeddings, when the roles run on several machines) a miss is looked up there
  before it counts, and every embedding written here is shared there too. A store built from a model config (sam-det's
  pipeline) takes the process's tier, which the process installs with ``use_remote_tier`` (the trainer's job, the
  prediction backend): models never read settings or the environment themselves.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
from pathlib import Path

import numpy as np

log = logging.getLogger("sam.store")

_KEY = re.compile(r"^[A-Za-z0-9_.-]{8,128}$")
_remote_tier = None  # () -> the process's shared tier or None; see use_remote_tier


def use_remote_tier(factory) -> None:
    """Install the process's shared tier for stores built from a model config: ``factory() -> tier or None``."""
    global _remote_tier
    _remote_tier = factory


def remote_tier():
    """The shared tier installed for this process (None when none is: one machine)."""
    return _remote_tier() if _remote_tier is not None else None


class EmbeddingStore:
    def __init__(self, root: Path | str, max_bytes: int, model_type: str = "vit_t", remote=None) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.remote = remote  # fetch(name, dest) -> bool, upload(name, bytes): the machines' shared tier
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.model_type = model_type
        self._lock = threading.Lock()

    def path(self, key: str) -> Path:
        if not _KEY.match(key):
            raise ValueError(f"not a content key: {key!r}")
        return self.root / f"{self.model_type}-{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        """The stored 256xHxW float32 embedding of ``key``, or None."""
        path = self.path(key)
        if self.remote is not None and not path.is_file():
            self._fetch(path)
        try:
            array = np.load(path, allow_pickle=False)
        except (FileNotFoundError, ValueError, OSError, EOFError):
            return None  # absent, evicted meanwhile, or unreadable: a miss either way
        try:
            os.utime(path)  # recently used: evicted last
        except OSError:
            pass
        return array

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def put(self, key: str, embedding: np.ndarray) -> None:
        """Store ``embedding`` (any leading batch axis of size 1 is dropped) atomically, then trim the folder."""
        array = np.ascontiguousarray(np.asarray(embedding, dtype=np.float32))
        if array.ndim == 4 and array.shape[0] == 1:
            array = array[0]
        if array.ndim != 3:
            raise ValueError(f"expected a CxHxW embedding, got shape {array.shape}")
        if array.nbytes > self.max_bytes:
            return
        path = self.path(key)
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{path.stem}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                np.save(handle, array, allow_pickle=False)
            if self.remote is not None:
                self.remote.upload(path.name, Path(tmp).read_bytes())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.trim(keep=path)

    def _fetch(self, path: Path) -> None:
        """The shared tier's copy, written in whole (temporary file, then rename) and trimmed like a put."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{path.stem}.", suffix=".tmp")
        os.close(fd)
        try:
            if self.remote.fetch(path.name, Path(tmp)):
                os.replace(tmp, path)
                self.trim(keep=path)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def trim(self, keep: Path | None = None) -> int:
        """Delete the least recently used files until the folder holds at most ``max_bytes``; returns how many.
        ``keep`` (the file just written) is never deleted: readers refreshing other files meanwhile can make it
        the oldest by mtime."""
        with self._lock:
            entries = []
            for path in self.root.glob("*.npy"):
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                entries.append((stat.st_mtime, stat.st_size, path))
            total = sum(size for _, size, _ in entries)
            removed = 0
            for _, size, path in sorted(entries, key=lambda e: e[0]):
                if total <= self.max_bytes:
                    break
                if path == keep:
                    continue
                path.unlink(missing_ok=True)
                total -= size
                removed += 1
            return removed

    def stats(self) -> dict[str, int]:
        files = list(self.root.glob("*.npy")) if self.root.exists() else []
        size = 0
        for path in files:
            try:
                size += path.stat().st_size
            except FileNotFoundError:
                pass
        return {"files": len(files), "bytes": size, "max_bytes": self.max_bytes}
