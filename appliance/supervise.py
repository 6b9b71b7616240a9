"""Run one supervised program: prefix its output with its name, hide secrets, pass signals, die with the parent.

supervisord starts ``python -m appliance run NAME``; this wrapper starts the real process. All output goes to
the container's stdout as ``name | line``. If the wrapper is killed (even with -9) the kernel sends the child
SIGTERM (PR_SET_PDEATHSIG), so no orphan keeps a port busy when supervisord restarts the program.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def scrub(line: str, secrets: list[str]) -> str:
    for value in secrets:
        if value and value in line:
            line = line.replace(value, "***")
    return line


def run_prefixed(name: str, argv: list[str], env: dict[str, str], secrets: list[str]) -> int:
    child = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             preexec_fn=_die_with_parent)

    stopping = []

    def forward(signum, _frame):
        stopping.append(signum)
        child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, forward)
    prefix = f"{name:<9}| ".encode()
    out = sys.stdout.buffer
    assert child.stdout is not None
    for raw in iter(child.stdout.readline, b""):
        line = scrub(raw.decode("utf-8", "replace"), secrets)
        out.write(prefix + line.encode())
        out.flush()
    code = child.wait()
    # Killed by the stop signal we passed on: that is a clean stop, not a crash.
    return 0 if stopping and code == -stopping[0] else code
