"""PostgreSQL for larger teams: the same appliance against a real PostgreSQL server (Debian's package).

The test starts the machine's PostgreSQL cluster, creates a role and a database, and boots the appliance with
APPLIANCE_DATABASE_URL: Label Studio migrates into PostgreSQL, the bootstrap converges, a restart duplicates nothing.
"""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path

import pytest

from harness import Appliance, appliance_env


def psql(sql: str) -> None:
    subprocess.run(["runuser", "-u", "postgres", "--", "psql", "-v", "ON_ERROR_STOP=1", "-qc", sql], check=True,
                   capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def database() -> str:
    versions = sorted(Path("/etc/postgresql").glob("*/main"))
    assert versions, "PostgreSQL is missing: apt-get install postgresql (make test installs it)"
    version = versions[-1].parent.name
    subprocess.run(["pg_ctlcluster", version, "main", "start"], capture_output=True, timeout=120)
    name, password = f"appliance_{secrets.token_hex(4)}", secrets.token_hex(12)
    psql(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
    psql(f"CREATE DATABASE {name} OWNER {name}")
    yield f"postgresql://{name}:{password}@127.0.0.1:5432/{name}"
    psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    psql(f"DROP ROLE IF EXISTS {name}")


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
