"""`appliance backup` and `appliance restore`: one .tar.gz of the data volume, taken while the appliance runs.

What goes in (paths relative to the data dir):

    manifest.json                     what this is: format, time, source data dir, database kind
    secrets.env                       kept 0600 in the archive and on restore
    state.json
    label-studio/label_studio.sqlite3 a consistent snapshot through SQLite's online backup API (never a raw copy of
                                      a database in WAL mode); absent with PostgreSQL, which pg_dump backs up
    label-studio/media/               uploads and exports
    images/ journal/ models/ trainer/ the registry's ``current`` symlink is stored as a link
    (cache/, run/, logs/ and trainer/runs/ are left out: caches, sockets, pids and scratch space)

The database is snapshot first, then the files: every upload the snapshot references is in the archive, and the
journal holds at least the annotations of the snapshot.

Restore unpacks into the configured data dir (APPLIANCE_DATA_DIR). It refuses while supervisord answers on
``<data>/run/supervisor.sock`` and refuses a non-empty data dir unless ``--force``. When the data dir moved, the
Local Files storages in the restored database are pointed at the new folders, so the next start's bootstrap
finds them (no duplicated tasks); the ML connections are pointed at the backend URLs configured now.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import sqlite3
import stat
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from appliance import orphans
from appliance.settings import Settings
from appliance.volume import make_private

FORMAT = 1
MANIFEST = "manifest.json"
DB_NAME = "label_studio.sqlite3"
DB_MEMBER = f"label-studio/{DB_NAME}"
FILES = ("secrets.env", "state.json")
FOLDERS = ("images", "journal", "models", "trainer", "label-studio/media")
# trainer/runs: scratch work of training runs; files: only a link to the images folder, made again at start
SKIPPED = ("cache", "run", "logs", "trainer/runs", "files")
PRIVATE = ("secrets.env",)
IN_MEMORY_LIMIT = 64 * 1024 * 1024  # files up to this size are read whole, so one that changes mid-copy stays whole
IGNORED_ENTRIES = {"lost+found"}
PG_NOTE = ("the database is PostgreSQL (APPLIANCE_DATABASE_URL): it is NOT in this archive; back it up separately "
           "with pg_dump, e.g. pg_dump --format=custom --file=labeling.dump \"$APPLIANCE_DATABASE_URL\"")
PG_RESTORE_NOTE = ("the archive holds no database (PostgreSQL): restore it separately with pg_restore, e.g. "
                   "pg_restore --clean --if-exists --dbname=\"$APPLIANCE_DATABASE_URL\" labeling.dump")


class BackupError(RuntimeError):
    """A backup or restore that cannot go on; the message is one line saying why and what to do."""


@dataclass
class Summary:
    path: Path
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    database: str = "sqlite"
    notes: list[str] = field(default_factory=list)


# --- backup ------------------------------------------------------------------------------------
def sqlite_snapshot(source: Path, target: Path) -> None:
    """A consistent copy of a live SQLite database (WAL or not) through the online backup API."""
    src = sqlite3.connect(source, timeout=30)  # reads only; read-write so a WAL database needs no -shm of ours
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)  # all pages in one step: one read transaction, one point in time
            check = dst.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise BackupError(f"the database snapshot failed its integrity check: {check}")
            dst.execute("PRAGMA journal_mode=DELETE")  # a single self-contained file in the archive
        finally:
            dst.close()
    finally:
        src.close()


def _tarinfo(name: str, st: os.stat_result, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = stat.S_IMODE(st.st_mode)
    info.mtime = int(st.st_mtime)
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _add_file(tar: tarfile.TarFile, path: Path, name: str) -> int:
    """Add one regular file; returns its size, or -1 when it vanished meanwhile."""
    try:
        with open(path, "rb") as handle:
            st = os.fstat(handle.fileno())
            info = _tarinfo(name, st)
            if st.st_size <= IN_MEMORY_LIMIT:
                data = handle.read()
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:  # large and, in this volume, written once (model weights): streamed
                info.size = st.st_size
                tar.addfile(info, handle)
            return info.size
    except FileNotFoundError:
        return -1


def _add_tree(tar: tarfile.TarFile, root: Path, base: Path, skip: set[Path], summary: Summary) -> None:
    """Add ``root`` recursively under its path relative to ``base``; symlinks are stored as links."""
    if not root.is_dir() or root in skip:
        return
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            st = folder.stat()
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except FileNotFoundError:
            continue
        tar.addfile(_tarinfo(folder.relative_to(base).as_posix(), st, tarfile.DIRTYPE))
        for entry in entries:
            path = Path(entry.path)
            name = path.relative_to(base).as_posix()
            if path in skip or entry.name.startswith(".tmp-") or entry.name.endswith(".tmp"):
                continue  # half-written registry versions and atomic-write temporaries
            try:
                if entry.is_symlink():
                    info = _tarinfo(name, entry.stat(follow_symlinks=False), tarfile.SYMTYPE)
                    info.linkname = os.readlink(path)
                    tar.addfile(info)
                    summary.files += 1
                elif entry.is_dir():
                    stack.append(path)
                elif entry.is_file():
                    size = _add_file(tar, path, name)
                    if size >= 0:
                        summary.files += 1
                        summary.bytes += size
            except FileNotFoundError:
                continue


def _registry_lock(settings: Settings):
    """The registry's writer lock, so publish/use/prune cannot move ``current`` while it is copied."""
    import fcntl
    from contextlib import contextmanager

    @contextmanager
    def locked():
        if not settings.models_dir.is_dir():
            yield
            return
        with open(settings.models_dir / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    return locked()


def backup(settings: Settings, output: Path) -> Summary:
    """Write a .tar.gz of the data volume to ``output`` (mode 0600: it holds the secrets)."""
    began = time.monotonic()
    data = settings.data
    if not data.is_dir():
        raise BackupError(f"the data dir {data} does not exist; set APPLIANCE_DATA_DIR to the appliance's volume")
    output = output.absolute()
    output.parent.mkdir(parents=True, exist_ok=True)
    summary = Summary(path=output, database="postgresql" if settings.database_url else "sqlite")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    tmp = Path(tmp_name)
    os.fchmod(fd, 0o600)
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz", compresslevel=6) as tar:
            manifest = {"format": FORMAT, "created": time.time(), "data_dir": str(data),
                        "images_dir": str(settings.images), "database": summary.database}
            with tempfile.TemporaryDirectory(dir=output.parent, prefix=".backup-db-") as scratch:
                db = settings.studio_dir / DB_NAME
                if summary.database == "sqlite":
                    if db.exists():
                        copy = Path(scratch) / DB_NAME
                        sqlite_snapshot(db, copy)
                        summary.bytes += _add_file(tar, copy, DB_MEMBER)
                        summary.files += 1
                    else:
                        summary.notes.append(f"no Label Studio database at {db} yet (never started?)")
                else:
                    summary.notes.append(PG_NOTE)
            info = json.dumps(manifest, indent=2).encode()
            entry = tarfile.TarInfo(MANIFEST)
            entry.size, entry.mtime, entry.mode = len(info), int(time.time()), 0o644
            tar.addfile(entry, io.BytesIO(info))
            for name in FILES:
                path = data / name
                if path.is_file() and _add_file(tar, path, name) >= 0:
                    summary.files += 1
            skip = {output, tmp} | {data / name for name in SKIPPED}
            for name in FOLDERS:
                if name == "models":
                    with _registry_lock(settings):
                        _add_tree(tar, data / name, data, skip, summary)
                elif name == "images" and settings.images != data / "images":
                    summary.notes.append(f"APPLIANCE_IMAGES_DIR={settings.images} is outside the data dir: "
                                         f"not in this archive; back it up with the images' own tools")
                else:
                    _add_tree(tar, data / name, data, skip, summary)
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    summary.seconds = time.monotonic() - began
    return summary


# --- restore -----------------------------------------------------------------------------------
def supervisord_answers(settings: Settings) -> bool:
    """True when something listens on the appliance's supervisord socket (the appliance is running)."""
    path = settings.run_dir / "supervisor.sock"
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        try:
            sock.connect(str(path))
            return True
        except OSError:
            return False


def _entries(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.name not in IGNORED_ENTRIES and not p.name.startswith(".restore-")]


def _check_member(member: tarfile.TarInfo) -> None:
    name = member.name
    parts = Path(name).parts
    if name.startswith("/") or ".." in parts or not parts:
        raise BackupError(f"the archive has an unsafe path {name!r}; refusing to restore it")
    if parts[0] not in {MANIFEST, *FILES, "label-studio", *(f.split("/")[0] for f in FOLDERS)}:
        raise BackupError(f"the archive has an unexpected entry {name!r}; is it an appliance backup?")
    if not (member.isfile() or member.isdir() or member.issym()):
        raise BackupError(f"the archive has a special file {name!r}; refusing to restore it")
    if member.issym() and (member.linkname.startswith("/") or
                           ".." in Path(os.path.normpath(Path(name).parent / member.linkname)).parts):
        raise BackupError(f"the archive's link {name!r} points outside the data dir; refusing to restore it")


def read_manifest(archive: Path) -> dict:
    try:
        with tarfile.open(archive, "r:gz") as tar:
            member = tar.getmember(MANIFEST)
            handle = tar.extractfile(member)
            return json.loads(handle.read()) if handle else {}
    except KeyError:
        raise BackupError(f"{archive} has no {MANIFEST}: not an appliance backup") from None
    except (OSError, tarfile.TarError, ValueError) as error:
        raise BackupError(f"cannot read {archive}: {error}") from None


def relocate_storages(db: Path, old: str, new: str) -> int:
    """Point Local Files storages (and their import links, keyed by absolute path) from ``old`` to ``new``."""
    if old == new:
        return 0

    def moved(path: str | None) -> str | None:
        if path is None:
            return None
        if path == old:
            return new
        if path.startswith(old.rstrip("/") + "/"):
            return new.rstrip("/") + path[len(old.rstrip("/")):]
        return None

    changed = 0
    with sqlite3.connect(db) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        for table, column, key in (("io_storages_localfilesmixin", "path", "id"),
                                   ("io_storages_localfilesimportstoragelink", "key", "id")):
            if table not in tables:
                continue
            for row_id, value in conn.execute(f"SELECT {key}, {column} FROM {table}").fetchall():
                target = moved(value)
                if target is not None:
                    conn.execute(f"UPDATE {table} SET {column} = ? WHERE {key} = ?", (target, row_id))
                    changed += 1
    return changed


def point_ml_backends(db: Path, urls: dict[str, str]) -> int:
    """Point the appliance's ML connections (matched by title) at the backend URLs configured now.

    The bootstrap would do it on the next start, but Label Studio 1.23 answers 500 to a PATCH that changes an ML
    backend's url without also naming its project (MLBackend.setup_() misses ``project``), so a restore onto other
    ports would leave the bootstrap failing.
    """
    changed = 0
    with sqlite3.connect(db) as conn:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='ml_mlbackend'").fetchone():
            return 0
        for title, url in urls.items():
            changed += conn.execute("UPDATE ml_mlbackend SET url = ? WHERE title = ? AND url != ?",
                                    (url, title, url)).rowcount
    return changed


def restore(settings: Settings, archive: Path, force: bool = False) -> Summary:
    began = time.monotonic()
    archive = archive.absolute()
    if not archive.is_file():
        raise BackupError(f"no backup at {archive}")
    data = settings.data
    if supervisord_answers(settings):
        raise BackupError(f"the appliance is running on {data} (supervisord answers on "
                          f"{settings.run_dir / 'supervisor.sock'}); stop it first, then restore")
    orphans.check(settings.run_dir)  # a supervisord without its socket, or programs that outlived theirs
    existing = _entries(data)
    if existing and not force:
        raise BackupError(f"the data dir {data} is not empty ({len(existing)} entries); restore into an empty "
                          f"dir, or add --force to replace its content")
    manifest = read_manifest(archive)
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{archive} is a backup of format {manifest.get('format')!r}; this appliance reads "
                          f"format {FORMAT}")
    summary = Summary(path=data, database=manifest.get("database", "sqlite"))
    data.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".restore-", dir=data))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member)
            for member in members:
                if member.name == MANIFEST:
                    continue
                tar.extract(member, staging, filter="data")
                if member.isfile():
                    summary.files += 1
                    summary.bytes += member.size
        for name in PRIVATE:
            if (staging / name).exists():
                os.chmod(staging / name, 0o600)
        db = staging / DB_MEMBER
        if db.exists():
            moved = relocate_storages(db, manifest.get("data_dir", str(data)), str(data))
            if moved:
                summary.notes.append(f"pointed {moved} Local Files storage path(s) from {manifest.get('data_dir')} "
                                     f"to {data}")
            from appliance.bootstrap import backends

            pointed = point_ml_backends(db, {b.title: b.url for b in backends(settings).values()})
            if pointed:
                summary.notes.append(f"pointed {pointed} ML connection(s) at this appliance's backend URLs")
        elif summary.database == "postgresql":
            summary.notes.append(PG_RESTORE_NOTE)
        for path in existing:  # --force: the old content goes, all of it, only now that the archive unpacked
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        for path in staging.iterdir():
            os.replace(path, data / path.name)
        make_private(data)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    summary.seconds = time.monotonic() - began
    return summary


# --- command line ------------------------------------------------------------------------------
def _settings() -> Settings:
    """Settings without touching the volume (no secrets generated into a dir about to be restored)."""
    import sys

    from appliance.settings import ConfigError, load_settings

    try:
        return load_settings()
    except ConfigError as error:
        print(error.line, file=sys.stderr, flush=True)
        raise SystemExit(error.code) from None


def backup_command(output: str) -> None:
    settings = _settings()
    try:
        summary = backup(settings, Path(output))
    except (BackupError, OSError, sqlite3.Error) as error:
        raise SystemExit(f"backup failed: {error}") from None
    for note in summary.notes:
        print(f"note: {note}")
    print(f"backup of {settings.data} written to {summary.path} (mode 0600): {summary.files} files, "
          f"{summary.bytes / 1e6:.1f} MB before compression, {summary.path.stat().st_size / 1e6:.1f} MB, "
          f"{summary.seconds:.1f} s")


def restore_command(archive: str, force: bool) -> None:
    settings = _settings()
    try:
        summary = restore(settings, Path(archive), force=force)
    except orphans.OrphanError as error:
        print(f"restore refused: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except (BackupError, OSError, sqlite3.Error, tarfile.TarError) as error:
        raise SystemExit(f"restore refused: {error}" if isinstance(error, BackupError)
                         else f"restore failed: {error}") from None
    for note in summary.notes:
        print(f"note: {note}")
    print(f"restored {summary.files} files into {summary.path} in {summary.seconds:.1f} s; "
          f"start the appliance (`appliance up`) to use them")
