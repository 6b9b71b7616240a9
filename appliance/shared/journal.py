"""The annotation journal across machines: every Label Studio replica writes submitted annotations to
gs://bucket/prefix/journal/ (a GCS export storage the bootstrap makes), and each trainer mirrors that folder into its
local journal folder. The trainer's watcher, schedule and dataset builder then work as on one machine: a file appears
(or changes, or goes) in the local folder when its object does in the bucket. inotify cannot see another machine's
writes, so the bucket is listed every APPLIANCE_SHARED_POLL_SECONDS instead.
"""

from __future__ import annotations

import logging
import os
import threading

from appliance.settings import Settings
from appliance.shared.bucket import RETRY, TIMEOUT, SharedBucket
from appliance.shared.registry import UNREACHABLE, _short

log = logging.getLogger("shared.journal")
FOLDER = "journal"


def journal_prefix(settings: Settings) -> str:
    """The object prefix Label Studio's GCS export storage writes the journal to."""
    return settings.shared_prefix + FOLDER


class JournalMirror:
    def __init__(self, settings: Settings, shared: SharedBucket | None = None):
        self.settings = settings
        self.shared = shared or SharedBucket(settings)
        self.folder = settings.journal_dir
        self.parts = settings.cache_dir / "journal-download"  # outside the watched folder: no half files there
        self.error: str | None = None

    def sync(self) -> int:
        """Make the local folder equal the shared one; returns the number of files written or removed."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.parts.mkdir(parents=True, exist_ok=True)
        remote = {}
        for blob in self.shared.list(FOLDER):
            name = blob.name.rsplit("/", 1)[-1]
            if name and not name.startswith("."):
                remote[name] = blob
        changed = 0
        for name, blob in remote.items():
            local = self.folder / name
            stamp = blob.updated.timestamp()
            if local.is_file() and local.stat().st_size == blob.size and local.stat().st_mtime == stamp:
                continue
            part = self.parts / name
            blob.download_to_filename(str(part), timeout=TIMEOUT, retry=RETRY)
            os.utime(part, (stamp, stamp))  # the annotation's time: what the trainer's schedule counts from
            os.replace(part, local)
            changed += 1
        for local in self.folder.iterdir():
            if local.is_file() and not local.name.startswith(".") and local.name not in remote:
                local.unlink(missing_ok=True)  # the annotation was deleted in Label Studio
                changed += 1
        return changed

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                changed = self.sync()
                if changed:
                    log.info("journal: %d file(s) updated from %s/%s", changed, self.settings.shared_state, FOLDER)
                self.error = None
            except UNREACHABLE as error:
                if self.error is None:
                    log.warning("journal %s/%s unreachable: %s; retrying", self.settings.shared_state, FOLDER,
                                _short(error))
                self.error = _short(error)
            stop.wait(self.settings.shared_poll_seconds)

    def start(self, stop: threading.Event) -> None:
        threading.Thread(target=self.run, args=(stop,), name="journal-mirror", daemon=True).start()
