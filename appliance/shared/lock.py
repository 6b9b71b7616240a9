"""One training run at a time, across every machine that shares the registry.

- The database is PostgreSQL: a session-level advisory lock (``pg_try_advisory_lock``). PostgreSQL releases it when
  the holder's connection ends, so a trainer killed with -9, or a node that vanished (TCP keepalives), frees it.
- Else, with APPLIANCE_SHARED_STATE: a lease object ``locks/training`` on GCS, created only if absent
  (``if_generation_match=0``), renewed and released only by its holder (the generation it wrote), and taken over once
  it has not been renewed for APPLIANCE_TRAINER_LEASE_SECONDS.
- Else (one machine): an fcntl lock on the registry folder.

``bootstrap_turn`` makes Label Studio replicas on one PostgreSQL database migrate it and bootstrap one after the
other.
"""

from __future__ import annotations

import fcntl
import json
import logging
import socket
import threading
import time
import uuid
import zlib
from contextlib import contextmanager
from typing import Callable, Iterator

from appliance.settings import Settings

log = logging.getLogger("shared.lock")
LOCK_KEY = zlib.crc32(b"labeling-appliance training") - 2**31  # fixed bigints of this appliance
BOOTSTRAP_KEY = zlib.crc32(b"labeling-appliance bootstrap") - 2**31
LEASE_OBJECT = "locks/training"


class Hold:
    """What ``training_lock`` yields: true when this process got the lock (false at once when another holds it);
    ``still_held()`` asks again, just before a run publishes: a dropped database connection or a lease taken over
    by another trainer means another run may have started meanwhile."""

    def __init__(self, held: bool, check: Callable[[], bool] = lambda: True):
        self.held = held
        self._check = check

    def __bool__(self) -> bool:
        return self.held

    def still_held(self) -> bool:
        try:
            return self.held and bool(self._check())
        except Exception:  # the database or GCS cannot say: count it as lost
            return False


@contextmanager
def training_lock(settings: Settings) -> Iterator[Hold]:
    """Yields a Hold: true while this process holds the lock, false (at once) when another holds it."""
    if settings.database_url:
        lock = postgres_lock
    elif settings.shared_state:
        lock = gcs_lease
    else:
        lock = file_lock
    with lock(settings) as held:
        yield held


@contextmanager
def file_lock(settings: Settings) -> Iterator[Hold]:
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    with open(settings.models_dir / ".train.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield Hold(False)
            return
        try:
            yield Hold(True)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _connect(settings: Settings, name: str):
    import psycopg

    # Keepalives: a holder whose machine vanished is noticed within about a minute, and its lock freed.
    return psycopg.connect(settings.database_url, autocommit=True, connect_timeout=10, keepalives=1,
                           keepalives_idle=20, keepalives_interval=10, keepalives_count=3, application_name=name)


@contextmanager
def bootstrap_turn(settings: Settings) -> Iterator[None]:
    """Label Studio replicas on one PostgreSQL database migrate it and bootstrap one at a time: the first creates the
    tables and the project, the others find them instead of racing to create them twice."""
    if not settings.database_url:
        yield
        return
    with _connect(settings, "appliance-bootstrap") as conn:
        # Tries, not a waiting pg_advisory_lock: a statement waiting that long would hold up the other replica's
        # CREATE INDEX CONCURRENTLY (it waits for every open transaction), which holds the lock: a deadlock.
        while not conn.execute("SELECT pg_try_advisory_lock(%s)", (BOOTSTRAP_KEY,)).fetchone()[0]:
            time.sleep(1)
        try:
            yield
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (BOOTSTRAP_KEY,))


@contextmanager
def postgres_lock(settings: Settings) -> Iterator[Hold]:
    import psycopg

    with _connect(settings, "appliance-trainer") as conn:
        held = conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()[0]
        try:
            # The session still answers: its lock is still held (PostgreSQL frees it only when the session ends).
            yield Hold(bool(held), lambda: conn.execute("SELECT 1").fetchone()[0] == 1)
        finally:
            if held and not conn.closed:
                try:
                    conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
                except psycopg.Error:
                    pass  # the session is gone, and the lock with it


class GcsLease:
    def __init__(self, settings: Settings):
        from appliance.shared.bucket import SharedBucket

        self.blob = SharedBucket(settings).blob(LEASE_OBJECT)
        self.seconds = settings.trainer_lease_seconds
        self.holder = f"{socket.gethostname()}/{uuid.uuid4().hex[:8]}"
        self.generation: int | None = None
        self.lost = threading.Event()

    def _write(self, if_generation_match: int) -> None:
        from appliance.shared.bucket import TIMEOUT

        body = json.dumps({"holder": self.holder, "renewed": time.time(), "seconds": self.seconds})
        self.blob.upload_from_string(body, content_type="application/json", if_generation_match=if_generation_match,
                                     timeout=TIMEOUT)  # no retry: a precondition answer is final
        self.generation = self.blob.generation

    def acquire(self) -> bool:
        from google.api_core import exceptions as api

        try:
            self._write(0)
            return True
        except api.PreconditionFailed:
            pass
        try:
            self.blob.reload()
            other = json.loads(self.blob.download_as_bytes(if_generation_match=self.blob.generation))
        except (api.NotFound, api.PreconditionFailed, ValueError):
            return False  # released or renewed meanwhile: try at the next run
        if time.time() - float(other.get("renewed", 0)) < float(other.get("seconds", self.seconds)):
            return False
        try:
            self._write(self.blob.generation)  # only if nobody renewed or took it since we read it
        except api.PreconditionFailed:
            return False
        log.warning("took over the training lease of %s (not renewed for %.0f s)", other.get("holder"),
                    time.time() - float(other.get("renewed", 0)))
        return True

    def renew(self) -> bool:
        """Renew now; False when another trainer took the lease over."""
        from google.api_core import exceptions as api

        if self.lost.is_set():
            return False
        try:
            self._write(self.generation)
        except api.PreconditionFailed:
            self.lost.set()
            return False
        return True

    def keep(self, stop: threading.Event) -> None:
        from google.api_core import exceptions as api

        while not stop.wait(self.seconds / 3):
            try:
                self._write(self.generation)
            except api.PreconditionFailed:
                log.error("the training lease was taken over by another trainer (this one stalled)")
                self.lost.set()
                return
            except Exception as error:  # GCS unreachable for a moment: try again at the next renewal
                log.warning("training lease not renewed: %s", error)

    def release(self) -> None:
        from google.api_core import exceptions as api

        try:
            self.blob.delete(if_generation_match=self.generation)
        except (api.NotFound, api.PreconditionFailed):
            pass


@contextmanager
def gcs_lease(settings: Settings) -> Iterator[Hold]:
    lease = GcsLease(settings)
    if not lease.acquire():
        yield Hold(False)
        return
    stop = threading.Event()
    keeper = threading.Thread(target=lease.keep, args=(stop,), name="training-lease", daemon=True)
    keeper.start()
    try:
        yield Hold(True, lease.renew)
    finally:
        stop.set()
        keeper.join(10)
        lease.release()
