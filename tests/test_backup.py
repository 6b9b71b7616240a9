"""`appliance backup` of a running appliance and `appliance restore` into a new data dir that a second appliance
then serves: annotation, project, secrets and model registry come back; the refusals are one line each."""

from __future__ import annotations

import os
import sqlite3
import stat
import tarfile
import threading
import time
from pathlib import Path

import pytest
import requests

from appliance import backup
from appliance.settings import load_settings
from harness import Appliance, appliance_env, cli


def registry_view(data_dir: Path) -> tuple[str | None, list[str]]:
    models = data_dir / "models"
    link = models / "current"
    current = os.readlink(link) if link.is_symlink() else None
    versions = sorted(p.name for p in (models / "versions").glob("v*")) if (models / "versions").is_dir() else []
    return current, versions


def project_tasks(app: Appliance) -> list[dict]:
    pid = app.state()["project_id"]
    return app.api("GET", f"/api/tasks?project={pid}&page_size=100").json()["tasks"]


BOX = {"from_name": "box", "to_name": "image", "type": "rectanglelabels", "original_width": 512,
       "original_height": 512, "image_rotation": 0,
       "value": {"x": 10.0, "y": 20.0, "width": 30.0, "height": 40.0, "rotation": 0, "rectanglelabels": ["Object"]}}


@pytest.fixture(scope="module")
def backed_up(appliance, tmp_path_factory):
    """One annotation made through the API, a backup taken while everything runs, then the annotation removed
    again (the session appliance's project is shared with the other tests)."""
    task = sorted(project_tasks(appliance), key=lambda t: t["id"])[-1]
    made = appliance.api("POST", f"/api/tasks/{task['id']}/annotations",
                         json={"result": [BOX], "was_cancelled": False})
    assert made.status_code == 201, made.text
    annotation = made.json()
    archive = tmp_path_factory.mktemp("backup") / "appliance.tar.gz"
    try:
        before = {"tasks": len(project_tasks(appliance)), "registry": registry_view(appliance.data_dir)}
        began = time.time()
        out = cli(appliance.env, "backup", "--output", str(archive))
        took = time.time() - began
    finally:
        appliance.api("DELETE", f"/api/annotations/{annotation['id']}")
    assert out.returncode == 0, out.stderr
    return {"archive": archive, "task": task, "annotation": annotation, "before": before, "seconds": took,
            "stdout": out.stdout}


def test_archive_is_private_consistent_and_complete(backed_up):
    archive = backed_up["archive"]
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600  # it holds the secrets
    with tarfile.open(archive) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert stat.S_IMODE(members["secrets.env"].mode) == 0o600
        for needed in ("manifest.json", "state.json", "label-studio/label_studio.sqlite3", "images", "journal",
                       "models"):
            assert needed in members, needed
        assert not [n for n in members if n.startswith(("cache", "run/", "logs"))]
        assert not [n for n in members if n.endswith(("-wal", "-shm"))]  # a snapshot, never the live files
        current, _ = backed_up["before"]["registry"]
        if current:
            assert members["models/current"].issym() and members["models/current"].linkname == current


def test_restore_into_a_new_dir_serves_the_same_project(appliance, backed_up, tmp_path, artifacts):
    data = tmp_path / "restored"
    env = appliance_env(data)
    out = cli(env, "restore", str(backed_up["archive"]))
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE((data / "secrets.env").stat().st_mode) == 0o600
    assert registry_view(data) == backed_up["before"]["registry"]  # versions, and `current` still a link to one
    with tarfile.open(backed_up["archive"]) as tar:
        journal = sorted(n.split("/", 1)[1] for n in tar.getnames() if n.startswith("journal/"))
    assert journal and sorted(p.name for p in (data / "journal").glob("*")) == journal

    second = Appliance(env=env, log_path=artifacts / "appliance-restored.log")
    second.log_path.write_text("")
    try:
        second.start(timeout=400)
        assert second.token == appliance.token
        assert second.api("GET", "/api/current-user/whoami").status_code == 200  # restored secrets, same token
        assert requests.get(f"{second.url}/api/projects", headers={"Authorization": "Token wrong"},
                            timeout=30).status_code == 401
        pid = appliance.state()["project_id"]
        assert second.state()["project_id"] == pid
        project = second.api("GET", f"/api/projects/{pid}").json()
        assert project["title"] == "Segmentation"
        tasks = project_tasks(second)
        assert len(tasks) == backed_up["before"]["tasks"]  # the moved Local Files storage duplicated nothing
        annotations = second.api("GET", f"/api/tasks/{backed_up['task']['id']}/annotations").json()
        assert [a["id"] for a in annotations] == [backed_up["annotation"]["id"]]
        assert annotations[0]["result"][0]["value"] == BOX["value"]
        backends = second.api("GET", f"/api/ml?project={pid}").json()
        assert sorted(b["url"] for b in backends) == sorted(
            [second.backend_url("sam"), second.backend_url("predict")])
        health = second.backend_health("predict")
        current, _ = backed_up["before"]["registry"]
        if current:
            assert health["model_version"] == Path(current).name
    finally:
        if second.proc is not None and second.proc.poll() is None:
            assert second.stop() == 0


def test_restore_refuses_a_non_empty_dir_in_one_line(backed_up, tmp_path):
    data = tmp_path / "busy"
    data.mkdir()
    (data / "something.txt").write_text("keep me")
    out = cli(appliance_env(data), "restore", str(backed_up["archive"]))
    assert out.returncode != 0
    assert len(out.stderr.strip().splitlines()) == 1 and "--force" in out.stderr, out.stderr
    assert [p.name for p in data.iterdir()] == ["something.txt"]
    forced = cli(appliance_env(data), "restore", "--force", str(backed_up["archive"]))
    assert forced.returncode == 0, forced.stderr
    assert not (data / "something.txt").exists() and (data / "secrets.env").exists()


def test_restore_refuses_while_the_appliance_runs(appliance, backed_up):
    secrets = (appliance.data_dir / "secrets.env").read_bytes()
    out = cli(appliance.env, "restore", str(backed_up["archive"]))  # never --force here: this is the live volume
    assert out.returncode != 0
    assert len(out.stderr.strip().splitlines()) == 1 and "stop it first" in out.stderr, out.stderr
    assert (appliance.data_dir / "secrets.env").read_bytes() == secrets


# --- without an appliance: the pieces --------------------------------------------------------
def test_sqlite_snapshot_of_a_database_written_meanwhile_is_consistent(tmp_path):
    """A writer commits pairs of rows in WAL mode while the snapshot runs: the copy holds whole transactions."""
    db = tmp_path / "live.sqlite3"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=wal")
    conn.execute("CREATE TABLE t (i INTEGER, pad BLOB)")
    conn.commit()
    stop = threading.Event()

    def write():
        writer = sqlite3.connect(db, timeout=30)
        for i in range(100000):
            if stop.is_set():
                break
            writer.execute("INSERT INTO t VALUES (?, randomblob(512))", (i,))
            writer.execute("INSERT INTO t VALUES (?, randomblob(512))", (i,))
            writer.commit()
        writer.close()

    thread = threading.Thread(target=write)
    thread.start()
    try:
        time.sleep(0.3)
        copies = []
        for n in range(3):
            copy = tmp_path / f"copy{n}.sqlite3"
            backup.sqlite_snapshot(db, copy)
            copies.append(copy)
            time.sleep(0.1)
    finally:
        stop.set()
        thread.join(30)
    counts = []
    for copy in copies:
        with sqlite3.connect(copy) as c:
            assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert c.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
            rows = c.execute("SELECT count(*) FROM t").fetchone()[0]
            assert rows % 2 == 0 and rows > 0
            counts.append(rows)
    assert counts == sorted(counts)


def test_registry_current_link_and_secrets_mode_survive_a_round_trip(tmp_path):
    from appliance.models.registry import ModelRegistry

    src = tmp_path / "src"
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.py", "weights.pth", "classes.json"):
        (model / name).write_text(name)
    registry = ModelRegistry(src / "models")
    first = registry.publish(model, {"segm_mAP": 0.1})
    registry.publish(model, {"segm_mAP": 0.2})
    registry.use(first)  # a rollback: current is not the newest
    (src / "secrets.env").write_text("LABEL_STUDIO_API_KEY=abc\n")
    os.chmod(src / "secrets.env", 0o600)
    (src / "cache").mkdir()
    (src / "cache" / "junk").write_text("x")
    archive = tmp_path / "b.tar.gz"
    backup.backup(load_settings({"APPLIANCE_DATA_DIR": str(src)}), archive)

    dst = tmp_path / "dst"
    summary = backup.restore(load_settings({"APPLIANCE_DATA_DIR": str(dst)}), archive)
    assert summary.files >= 7
    assert (dst / "models" / "current").is_symlink()
    assert os.readlink(dst / "models" / "current") == os.readlink(src / "models" / "current")
    assert ModelRegistry(dst / "models").current().version == first
    assert stat.S_IMODE((dst / "secrets.env").stat().st_mode) == 0o600
    assert not (dst / "cache").exists()
    with pytest.raises(backup.BackupError, match="--force"):
        backup.restore(load_settings({"APPLIANCE_DATA_DIR": str(dst)}), archive)


def test_postgres_backup_says_pg_dump_and_keeps_the_rest(tmp_path):
    src = tmp_path / "pg"
    (src / "journal").mkdir(parents=True)
    (src / "journal" / "1").write_text("{}")
    settings = load_settings({"APPLIANCE_DATA_DIR": str(src),
                              "APPLIANCE_DATABASE_URL": "postgresql://u:p@db.example:5432/labels"})
    summary = backup.backup(settings, tmp_path / "pg.tar.gz")
    assert summary.database == "postgresql" and any("pg_dump" in n for n in summary.notes)
    with tarfile.open(tmp_path / "pg.tar.gz") as tar:
        names = tar.getnames()
    assert "journal/1" in names and not any(n.endswith(".sqlite3") for n in names)


def test_an_archive_escaping_the_data_dir_is_refused(tmp_path):
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        for name, data in (("manifest.json", b'{"format": 1}'), ("../outside.txt", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            import io

            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(backup.BackupError, match="unsafe"):
        backup.restore(load_settings({"APPLIANCE_DATA_DIR": str(tmp_path / "d")}), evil)
    assert not (tmp_path / "outside.txt").exists()
