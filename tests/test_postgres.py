"""PostgreSQL for larger teams: the same appliance against a real PostgreSQL server (Debian's package).

The test starts the machine's PostgreSQL cluster, creates a role and a database, and boots the appliance with
APPLIANCE_DATABASE_URL: Label Studio migrates into PostgreSQL, the bootstrap converges, a restart duplicates nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from appliance.settings import load_settings
from appliance.shared.lock import training_lock
from harness import ROOT, Appliance, appliance_env, postgres_database, psql


@pytest.fixture(scope="module")
def database() -> str:
    with postgres_database() as url:
        yield url


def test_appliance_on_postgresql(database, tmp_path, artifacts):
    app = Appliance(env=appliance_env(tmp_path / "data", APPLIANCE_DATABASE_URL=database),
                    log_path=artifacts / "postgres-appliance.log")
    app.log_path.write_text("")
    app.start(timeout=600)
    try:
        assert not (app.data_dir / "label-studio" / "label_studio.sqlite3").exists()
        pid = app.state()["project_id"]
        backends = app.api("GET", f"/api/ml?project={pid}").json()
        assert len(backends) == 2 and {b["state"] for b in backends} == {"CO"}
        tasks = app.api("GET", f"/api/projects/{pid}/export", params={"exportType": "JSON",
                                                                      "download_all_tasks": "true"}).json()
        assert len(tasks) == 5
        assert app.stop() == 0
        app.start(timeout=600)
        assert len(app.api("GET", f"/api/projects/{pid}/export",
                           params={"exportType": "JSON", "download_all_tasks": "true"}).json()) == 5
        assert len(app.api("GET", f"/api/ml?project={pid}").json()) == 2
        assert database.split(":")[2].split("@")[0] not in app.log_text()  # the database password is a secret
    finally:
        if app.proc and app.proc.poll() is None:
            app.stop()


HOLD = """
import sys, time
from appliance.settings import load_settings
from appliance.shared.lock import training_lock
with training_lock(load_settings()) as held:
    print(bool(held), flush=True)
    time.sleep(600)
"""


def test_the_training_lock_is_a_postgres_advisory_lock_freed_when_its_holder_dies(database, tmp_path):
    env = {**os.environ, "APPLIANCE_DATA_DIR": str(tmp_path / "node-a"), "APPLIANCE_DATABASE_URL": database}
    holder = subprocess.Popen([sys.executable, "-c", HOLD], env=env, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "True"
        # Another machine: its own data dir, the same database.
        other = load_settings({"APPLIANCE_DATA_DIR": str(tmp_path / "node-b"), "APPLIANCE_DATABASE_URL": database})
        with training_lock(other) as held:
            assert not held
        holder.kill()  # a trainer killed mid-run: PostgreSQL ends its session and frees the lock
        holder.wait(10)
        deadline, held = time.time() + 30, False
        while not held and time.time() < deadline:
            with training_lock(other) as held:
                pass
            time.sleep(0.2)
        assert held
    finally:
        holder.kill()


def test_replicas_on_one_database_bootstrap_one_at_a_time(database, tmp_path):
    from appliance.shared.lock import bootstrap_turn

    replicas = [load_settings({"APPLIANCE_DATA_DIR": str(tmp_path / f"r{i}"), "APPLIANCE_DATABASE_URL": database})
                for i in (1, 2)]
    inside, order = threading.Event(), []

    def second() -> None:
        inside.wait(10)
        with bootstrap_turn(replicas[1]):
            order.append("second in")

    thread = threading.Thread(target=second)
    thread.start()
    with bootstrap_turn(replicas[0]):
        inside.set()
        time.sleep(1.5)  # the other replica is waiting for its turn meanwhile
        order.append("first out")
    thread.join(20)
    assert order == ["first out", "second in"]


def test_a_trainer_whose_database_session_ended_knows_it_lost_the_lock(database, tmp_path):
    settings = load_settings({"APPLIANCE_DATA_DIR": str(tmp_path), "APPLIANCE_DATABASE_URL": database})
    with training_lock(settings) as hold:
        assert hold and hold.still_held()
        # The database restarted, or an admin ended the session: PostgreSQL freed the lock with it.
        psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'appliance-trainer'")
        assert not hold.still_held()
    with training_lock(settings) as hold:
        assert hold  # free for the next run
