"""Which processes belong to a run of the appliance on a data dir, and whether any outlived their supervisord.

Two lock files in ``<data>/run/``:

    supervisord.lock  held (exclusive) by `appliance up` and, through execve, by the supervisord it becomes
    programs.lock     held (shared) by every supervised program and inherited by its children (gunicorn workers)

The kernel drops a lock when the last process holding it ends, so after supervisord is gone (even ``kill -9``)
a shared holder of ``programs.lock`` is an orphan of that run. ``appliance up`` and ``appliance restore`` refuse
to go on while one lives: it would hold a port or write into the data dir being replaced.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

SUPERVISOR_LOCK = "supervisord.lock"
PROGRAMS_LOCK = "programs.lock"


class OrphanError(RuntimeError):
    """Processes of another run still use this data dir; the message is one line saying which and what to do."""


def _open(run_dir: Path, name: str) -> int:
    run_dir.mkdir(parents=True, exist_ok=True)
    return os.open(run_dir / name, os.O_RDWR | os.O_CREAT, 0o600)


def holders(path: Path) -> list[int]:
    """Pids of the processes that have ``path`` open (those we may inspect), this one excepted."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if any(os.readlink(fd) == str(path) for fd in (entry / "fd").iterdir()):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return sorted(found)


def _describe(pids: list[int]) -> str:
    if not pids:
        return "unknown (processes of another user)"
    names = []
    for pid in pids[:6]:
        try:
            argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
            names.append(f"{pid} ({' '.join(a.decode(errors='replace') for a in argv[:4] if a)[:60]})")
        except OSError:
            names.append(str(pid))
    return ", ".join(names) + (f" and {len(pids) - 6} more" if len(pids) > 6 else "")


def lock_supervisor(run_dir: Path) -> int:
    """Take the supervisor lock for this process and the supervisord it execs into (the fd survives execve);
    OrphanError when a supervisord of this data dir runs."""
    fd = _open(run_dir, SUPERVISOR_LOCK)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pids = holders(run_dir / SUPERVISOR_LOCK)
        raise OrphanError(f"the appliance already runs on {run_dir.parent} (supervisord pid "
                          f"{', '.join(map(str, pids)) or 'unknown'}); stop it first") from None
    os.set_inheritable(fd, True)
    return fd


def check(run_dir: Path) -> None:
    """Raise OrphanError when a supervisord or processes of a previous run on this data dir are still alive."""
    if (run_dir / SUPERVISOR_LOCK).exists():
        os.close(lock_supervisor(run_dir))
    check_programs(run_dir)


def check_programs(run_dir: Path) -> None:
    """Raise OrphanError when supervised programs of a previous run on this data dir are still alive."""
    if not (run_dir / PROGRAMS_LOCK).exists():
        return
    fd = _open(run_dir, PROGRAMS_LOCK)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pids = holders(run_dir / PROGRAMS_LOCK)
        raise OrphanError(f"processes of a previous run still use {run_dir.parent}: pid {_describe(pids)}; "
                          f"stop them (kill PID) and try again") from None
    finally:
        os.close(fd)


def hold_programs_lock(run_dir: Path) -> int:
    """Mark this process (and the children it passes the fd to) as part of the current run."""
    fd = _open(run_dir, PROGRAMS_LOCK)
    fcntl.flock(fd, fcntl.LOCK_SH)
    os.set_inheritable(fd, True)
    return fd
