"""Run one supervised program: prefix its output with its name, hide secrets, pass signals, die with the parent.

supervisord starts ``python -m appliance run NAME``; this wrapper starts the real process. All output goes to
the container's stdout as ``name | line``. If the wrapper is killed (even with -9) the kernel sends the child
SIGTERM (PR_SET_PDEATHSIG), so no orphan keeps a port busy when supervisord restarts the program.

The wrapper is tied to supervisord the same way: when supervisord dies (even with -9) the wrapper gets SIGTERM,
stops its whole process group (gunicorn workers, the trainer's training job) and kills what is left after a
grace period, so nothing of the run outlives it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading

PR_SET_PDEATHSIG = 1
ORPHAN_GRACE_S = 25  # gunicorn's graceful timeout (20 s) and a little more
try:
    _prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl  # resolved here: preexec_fn runs after fork
except (OSError, AttributeError):
    _prctl = None


def die_with_parent() -> None:
    """Ask the kernel for SIGTERM when the parent ends (used in preexec_fn and by the wrapper itself)."""
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def tie_to(parent: int | None) -> None:
    """Die with ``parent`` (supervisord); if it is gone already (before prctl took effect), exit now."""
    die_with_parent()
    if parent and os.getppid() != parent:
        raise SystemExit(1)


class _Group:
    """This wrapper's process group, stopped as a whole once supervisord is gone."""

    def __init__(self, parent: int | None):
        self.parent = parent
        self.abandoned = False

    def orphaned(self) -> bool:
        return bool(self.parent) and os.getppid() != self.parent

    def stop(self) -> None:
        if self.abandoned or os.getpgrp() != os.getpid():
            return  # done already, or not our group to stop (run by hand from a shell)
        self.abandoned = True
        os.killpg(0, signal.SIGTERM)  # reaches us too: the handler sees ``abandoned`` and returns
        timer = threading.Timer(ORPHAN_GRACE_S, self.kill)
        timer.daemon = True
        timer.start()

    def kill(self) -> None:
        if os.getpgrp() == os.getpid():
            os.killpg(0, signal.SIGKILL)


def scrub(line: str, secrets: list[str]) -> str:
    for value in secrets:
        if value and value in line:
            line = line.replace(value, "***")
    return line


def run_prefixed(name: str, argv: list[str], env: dict[str, str], secrets: list[str],
                 keep_fds: tuple[int, ...] = (), parent: int | None = None) -> int:
    """Run ``argv`` with its output prefixed; ``parent``: supervisord's pid (its death stops the whole group)."""
    child = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             preexec_fn=die_with_parent, pass_fds=keep_fds)
    group = _Group(parent)
    stopping = []

    def forward(signum, _frame):
        if group.abandoned:
            return
        stopping.append(signum)
        child.send_signal(signum)
        if group.orphaned():
            group.stop()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, forward)
    if group.orphaned():  # supervisord died while the child started
        forward(signal.SIGTERM, None)
    prefix = f"{name:<9}| ".encode()
    out = sys.stdout.buffer
    assert child.stdout is not None
    for raw in iter(child.stdout.readline, b""):
        line = scrub(raw.decode("utf-8", "replace"), secrets)
        try:
            out.write(prefix + line.encode())
            out.flush()
        except OSError:  # supervisord's end of the pipe is gone: keep draining so the child never blocks
            pass
    code = child.wait()
    if group.abandoned:
        group.kill()  # whatever of the group is still there (a worker, a training job), us included
    # Killed by the stop signal we passed on: that is a clean stop, not a crash.
    return 0 if stopping and code == -stopping[0] else code
