"""`kill -9` of supervisord (issue 14, finding 5) on an appliance of its own: every supervised program and its
children die with it, orphans that survive anyway (here: a wrapper held stopped) make `appliance up` and
`appliance restore` refuse in one line, and the next start cleans what an interrupted training run left behind.

The same appliance, fresh and serving no model yet, shows finding 8's model version that failed to load: /health
says so, and the version serves once its files are fixed."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from appliance.models.registry import ModelRegistry
from appliance.settings import load_settings
from harness import ROOT, Appliance, appliance_env, cli


def processes() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, process group, command line) of every live (not zombie) process."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z":
            found[int(entry.name)] = (int(fields[1]), int(fields[2]), cmdline)
    return found


def descendants(root: int) -> dict[int, str]:
    table = processes()
    tree, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _, cmdline) in table.items():
            if ppid == parent and pid not in tree:
                tree[pid] = cmdline
                frontier.append(pid)
    return tree


def alive(pids) -> set[int]:
    return set(pids) & set(processes())


def wait_gone(pids, timeout: float) -> None:
    deadline = time.time() + timeout
    while alive(pids):
        assert time.time() < deadline, {pid: processes().get(pid) for pid in alive(pids)}
        time.sleep(0.5)


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


def health(app: Appliance) -> dict:
    settings = load_settings(app.env)
    auth = app.backend_auth
    return requests.get(f"{settings.predict_base_url}/health", auth=auth, timeout=5).json()


def wait_health(app: Appliance, condition, timeout: float) -> dict:
    deadline = time.time() + timeout
    while True:
        report = health(app)
        if condition(report):
            return report
        assert time.time() < deadline, report
        time.sleep(0.5)


def check_failed_version_is_retried_when_fixed(app: Appliance, scratch: Path) -> None:
    from random_model import random_model

    good = ModelRegistry(scratch).path(random_model(scratch, ["Object"]))
    broken = scratch / "broken"
    broken.mkdir()
    for name in ("config.py", "classes.json"):
        shutil.copy2(good / name, broken / name)
    (broken / "weights.pth").write_bytes(b"not a checkpoint")
    version = ModelRegistry(app.data_dir / "models").publish(broken, {})
    report = wait_health(app, lambda h: version in str(h.get("error")), 60)
    assert report["model_version"] == "no-model" and "failed to load" in report["message"], report
    assert "no model yet" not in report["message"]
    weights = app.data_dir / "models" / "versions" / version / "weights.pth"
    shutil.copy2(good / "weights.pth", weights.with_suffix(".fixed"))
    os.replace(weights.with_suffix(".fixed"), weights)
    report = wait_health(app, lambda h: h.get("model_version") == version, 90)
    assert report["error"] is None and report["message"] is None


PR_SET_CHILD_SUBREAPER = 36


def subreaper(on: bool) -> None:
    """Orphans of supervisord reparent to this test process instead of init.

    Why: when supervisord dies, Linux sends SIGHUP and SIGCONT to a process group that it leaves orphaned (no
    member's parent in another group of the same session) if a member is stopped, so the stopped wrapper would be
    woken and clean up, or not, depending on whether SIGSTOP had taken effect first. With supervisord in this
    test's session and this process as their new parent, the group is not orphaned and stays stopped, every run."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0, ctypes.get_errno()


def wait_state(pid: int, state: str, timeout: float = 10) -> None:
    deadline = time.time() + timeout
    while (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != state:
        assert time.time() < deadline, f"{pid} never reached state {state}"
        time.sleep(0.05)


def reap(pids) -> None:
    """The orphans this process adopted (as subreaper) are its children now: collect their exit status."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def test_kill_9_of_supervisord_leaves_no_orphans(tmp_path, artifacts):
    app = Appliance(env=appliance_env(tmp_path / "data"), log_path=artifacts / "orphans.log")
    app.log_path.write_text("")
    subreaper(True)
    app.start(new_session=False)
    stopped, tree = None, {}
    try:
        check_failed_version_is_retried_when_fixed(app, tmp_path / "scratch")

        supervisord = app.proc.pid
        tree = descendants(supervisord)
        names = " ".join(tree.values())
        for program in ("run studio", "run sam", "run predict", "run train", "gunicorn", "appliance trainer"):
            assert program in names, tree
        stopped = next(pid for pid, cmd in tree.items() if "appliance run predict" in cmd)
        predict_group = {pid for pid in tree if processes().get(pid, (0, 0))[1] == stopped}
        assert len(predict_group) >= 2  # the wrapper and gunicorn (and its worker)
        os.kill(stopped, signal.SIGSTOP)  # this wrapper cannot act on supervisord's death: its group lives on
        wait_state(stopped, "T")
        os.kill(supervisord, signal.SIGKILL)
        app.proc.wait(10)
        wait_gone(set(tree) - predict_group, 45)

        refused = cli(app.env, "up")
        lines = (refused.stdout + refused.stderr).strip().splitlines()
        assert refused.returncode == 2 and len(lines) == 1, lines
        assert "previous run" in lines[0] and str(stopped) in lines[0], lines
        archive = tmp_path / "backup.tar.gz"
        archive.write_bytes(b"")
        refused = cli(app.env, "restore", str(archive))
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and len(lines) == 1 and "previous run" in lines[0], lines

        os.kill(stopped, signal.SIGCONT)  # the pending parent-death signal now stops the whole group
        stopped = None
        deadline = time.time() + 45
        while alive(tree):
            reap(tree)
            assert time.time() < deadline, {pid: processes().get(pid) for pid in alive(tree)}
            time.sleep(0.5)
        ports = [int(app.env[k]) for k in ("APPLIANCE_PORT", "APPLIANCE_SAM_PORT", "APPLIANCE_PREDICT_PORT")]
        assert all(port_free(port) for port in ports)

        # What a training run cut short by the kill leaves: its status and its run folder.
        trainer = app.data_dir / "trainer"
        (trainer / "runs" / "20261122T031500" / "train").mkdir(parents=True)
        status = json.loads((trainer / "status.json").read_text()) if (trainer / "status.json").exists() else {}
        status.update(state="running", run="20261122T031500", stage="train", epoch=13, max_epochs=15)
        (trainer / "status.json").write_text(json.dumps(status))
        app.start()
        status = json.loads((trainer / "status.json").read_text())
        assert status["state"] == "interrupted" and status["epoch"] is None, status
        assert "20261122T031500" in status["error"]
        assert not (trainer / "runs").exists() or not any((trainer / "runs").iterdir())
        assert "trainer: cleaned" in app.log_text()
        shown = cli(app.env, "status").stdout.split("Trainer:")[-1]
        assert "epoch 13" not in shown and "interrupted" in shown.splitlines()[1], shown
    finally:
        if stopped:
            os.kill(stopped, signal.SIGCONT)
        if app.proc and app.proc.poll() is None:
            app.stop()
        subreaper(False)
        reap(tree)


def test_locks_tell_a_running_supervisor_and_orphans_apart(tmp_path):
    """The pieces, without an appliance: a second supervisor is refused, a process still holding the programs'
    lock is named, and once it is gone the data dir is free."""
    from appliance import orphans

    run = tmp_path / "run"
    held = orphans.lock_supervisor(run)
    try:
        refused = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from appliance import "
                                  "orphans; orphans.check(Path(sys.argv[1]))", str(run)],
                                 capture_output=True, text=True, cwd=ROOT)
        assert "already runs" in refused.stderr and str(os.getpid()) in refused.stderr
    finally:
        os.close(held)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; from appliance "
                               "import orphans; orphans.hold_programs_lock(Path(sys.argv[1])); print('held', "
                               "flush=True); time.sleep(60)", str(run)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(orphans.OrphanError) as caught:
            orphans.check(run)
        assert str(holder.pid) in str(caught.value) and "previous run" in str(caught.value)
    finally:
        holder.kill()
        holder.wait()
    orphans.check(run)  # nothing left: free
