"""A size-bounded LRU of image embeddings, keyed by image content."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from concurrent.futures import Future
from typing import Any, Callable, Protocol, TypeVar


class Sized(Protocol):
    nbytes: int


T = TypeVar("T", bound=Sized)


def content_key(image_bytes: bytes) -> str:
    """Stable key for an image's bytes (the same file fetched twice hits the cache)."""
    return hashlib.blake2b(image_bytes, digest_size=20).hexdigest()


class EmbeddingCache:
    """Thread-safe LRU bounded by the total ``nbytes`` of its values.

    ``get_or_compute`` runs ``fn`` once per missing key even under concurrency: later callers of the same key
    wait for the first one's result (counted as hits, since they cause no computation). A value larger than
    ``max_bytes`` is returned but not kept.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, Sized] = OrderedDict()
        self._pending: dict[str, Future] = {}
        self._bytes = self._hits = self._misses = self._evictions = 0

    def get(self, key: str) -> Any | None:
        with self._lock:
            value = self._lookup(key)
            if value is None:
                self._misses += 1
            return value

    def put(self, key: str, value: Sized) -> None:
        with self._lock:
            self._store(key, value)

    def get_or_compute(self, key: str, fn: Callable[[], T]) -> T:
        with self._lock:
            value = self._lookup(key)
            if value is not None:
                return value  # type: ignore[return-value]
            future = self._pending.get(key)
            owner = future is None
            if owner:
                future = self._pending[key] = Future()
                self._misses += 1
            else:
                self._hits += 1
        if not owner:
            return future.result()
        return self._compute(key, fn, future)

    def _compute(self, key: str, fn: Callable[[], T], future: Future) -> T:
        try:
            value = fn()
        except BaseException as exc:
            with self._lock:
                del self._pending[key]
            future.set_exception(exc)
            raise
        with self._lock:  # store and un-pend atomically so no caller can slip between and recompute
            self._store(key, value)
            del self._pending[key]
        future.set_result(value)
        return value

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._entries), "bytes": self._bytes, "max_bytes": self.max_bytes,
                    "hits": self._hits, "misses": self._misses, "evictions": self._evictions}

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    # --- callers hold self._lock -------------------------------------------------------------
    def _lookup(self, key: str) -> Any | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
            self._hits += 1
        return value

    def _store(self, key: str, value: Sized) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old.nbytes
        if value.nbytes > self.max_bytes:
            return
        self._entries[key] = value
        self._bytes += value.nbytes
        while self._bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.nbytes
            self._evictions += 1
