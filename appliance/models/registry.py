"""Versioned model store with an atomically switched `current` pointer.

Layout under root:
    versions/v0001-20261122T031500/{config.py, weights.pth, classes.json, metrics.json}
    current -> versions/v0001-20261122T031500      (relative symlink)
    .lock                                          (fcntl lock for writers)

A version appears in versions/ only complete (built in a temp dir, then
renamed), and `current` is replaced with os.replace, so readers never see a
half-written model. Writers (publish/use/prune) serialise on the lock file and
may live in different processes.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

REQUIRED_FILES = ("config.py", "weights.pth", "classes.json")
_NAME = re.compile(r"^v(\d{4,})-(\d{8}T\d{6})$")
_STALE_TEMP_S = 3600


class UnknownVersionError(LookupError):
    pass


@dataclass
class VersionInfo:
    version: str
    path: Path
    created: datetime
    metrics: dict = field(default_factory=dict)
    is_current: bool = False


class ModelRegistry:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / "versions"
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        self._current_link = self.root / "current"
        self._lock_path = self.root / ".lock"

    # --- readers (lock-free) ------------------------------------------------------
    def current(self) -> VersionInfo | None:
        name = self._current_name()
        return self._info(name, name) if name else None

    def list(self) -> list[VersionInfo]:
        """All complete versions, oldest first."""
        current = self._current_name()
        return [self._info(name, current) for name in self._names()]

    def path(self, version: str) -> Path:
        path = self.versions_dir / version
        if not _NAME.match(version) or not path.is_dir():
            raise UnknownVersionError(
                f"unknown model version {version!r}; known: {self._names() or 'none'}")
        return path

    def pull(self, force: bool = False) -> str | None:
        """Follow the registry other machines publish to: see appliance.shared.registry. Here: nothing to follow."""
        return None

    # --- writers (locked) -----------------------------------------------------------
    def publish(self, src_dir: Path, metrics: dict | None = None, make_current: bool = True) -> str:
        """Copy a trained model dir in as a new version; return its name."""
        src_dir = Path(src_dir)
        missing = [f for f in REQUIRED_FILES if not (src_dir / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{src_dir} lacks {', '.join(missing)}")
        temp = self.versions_dir / f".tmp-{uuid.uuid4().hex}"
        try:
            shutil.copytree(src_dir, temp)
            _write_json(temp / "metrics.json", metrics or {})
            _fsync_tree(temp)
            with self._locked():
                version = self._next_name()
                os.rename(temp, self.versions_dir / version)
                if make_current:
                    self._point_current(version)
        finally:
            shutil.rmtree(temp, ignore_errors=True)
        return version

    def use(self, version: str) -> VersionInfo:
        """Make `version` current (rollback or roll forward)."""
        with self._locked():
            self.path(version)
            self._point_current(version)
        return self._info(version, version)

    def prune(self, keep: int) -> list[str]:
        """Delete all but the newest `keep` versions, never the current one."""
        if keep < 0:
            raise ValueError("keep must be >= 0")
        with self._locked():
            names, current = self._names(), self._current_name()
            doomed = [n for n in names[:max(0, len(names) - keep)] if n != current]
            for name in doomed:
                trash = self.versions_dir / f".trash-{uuid.uuid4().hex}"
                os.rename(self.versions_dir / name, trash)
                shutil.rmtree(trash, ignore_errors=True)
            self._remove_stale_temps()
        return doomed

    # --- internals ------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self._lock_path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _names(self) -> list[str]:
        names = [p.name for p in self.versions_dir.iterdir() if _NAME.match(p.name) and p.is_dir()]
        return sorted(names, key=lambda n: int(_NAME.match(n).group(1)))

    def _next_name(self) -> str:
        names = self._names()
        number = int(_NAME.match(names[-1]).group(1)) + 1 if names else 1
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        return f"v{number:04d}-{stamp}"

    def _current_name(self) -> str | None:
        try:
            target = os.readlink(self._current_link)
        except (FileNotFoundError, OSError):
            return None
        name = Path(target).name
        return name if (self.versions_dir / name).is_dir() else None

    def _point_current(self, version: str) -> None:
        temp = self.root / f".current-{uuid.uuid4().hex}"
        os.symlink(os.path.join("versions", version), temp)
        os.replace(temp, self._current_link)
        _fsync_dir(self.root)

    def _info(self, name: str, current: str | None) -> VersionInfo:
        path = self.versions_dir / name
        try:
            metrics = json.loads((path / "metrics.json").read_text())
        except (OSError, ValueError):
            metrics = {}
        stamp = _NAME.match(name).group(2)
        created = datetime.strptime(stamp, "%Y%m%dT%H%M%S").replace(tzinfo=timezone.utc)
        return VersionInfo(name, path, created, metrics, name == current)

    def _remove_stale_temps(self) -> None:
        """Leftovers of publishers that crashed before their rename."""
        for path in list(self.versions_dir.glob(".tmp-*")) + list(self.versions_dir.glob(".trash-*")):
            if time.time() - path.stat().st_mtime > _STALE_TEMP_S or path.name.startswith(".trash-"):
                shutil.rmtree(path, ignore_errors=True)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
