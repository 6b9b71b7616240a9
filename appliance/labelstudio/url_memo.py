"""Which content key an image URL served lately: saves the SAM backend a download per click.

Bounded twice: entries are keyed by a digest of the URL (a data: URI of megabytes costs 16 bytes here, not a copy
of itself) and at most ``capacity`` of them are kept, the least recently used going first.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict


class UrlMemo:
    def __init__(self, capacity: int, ttl_seconds: float):
        self.capacity = capacity
        self.ttl = ttl_seconds
        self._entries: OrderedDict[bytes, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _digest(url: str) -> bytes:
        return hashlib.blake2b(url.encode("utf-8", "surrogatepass"), digest_size=16).digest()

    def get(self, url: str) -> str | None:
        """The content key ``url`` served less than ``ttl_seconds`` ago, else None."""
        digest = self._digest(url)
        with self._lock:
            known = self._entries.get(digest)
            if known is None:
                return None
            if time.monotonic() - known[1] >= self.ttl:
                del self._entries[digest]
                return None
            self._entries.move_to_end(digest)
            return known[0]

    def put(self, url: str, key: str) -> None:
        digest = self._digest(url)
        with self._lock:
            self._entries[digest] = (key, time.monotonic())
            self._entries.move_to_end(digest)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def stats(self) -> dict[str, int]:
        """Entries, the most kept, and the bytes of what they hold (digests and content keys)."""
        with self._lock:
            held = sum(len(digest) + len(key) for digest, (key, _) in self._entries.items())
            return {"entries": len(self._entries), "capacity": self.capacity, "bytes": held}
