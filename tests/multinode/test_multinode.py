"""The roles on separate "machines": separate processes with separate data dirs, sharing only one PostgreSQL
database and one GCS-emulator bucket (APPLIANCE_SHARED_STATE), as the Kubernetes manifests and the compose file run
them. `make multinode-test` (its own CI step: it boots two Label Studio replicas, a backends node and two trainers).

    backends  (sam,predict)   studio-1 (studio)   studio-2 (studio)   trainer-1 (train)   trainer-2 (train)

Annotations submitted through studio-2 reach the shared journal; one trainer trains while the other is refused the
lock; the backends node serves the version that trainer published; a trainer killed with -9 mid-run leaves the
serving model and the shared registry untouched, and frees the lock for the other trainer.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import requests

from harness import ROOT, Appliance, appliance_env, free_port, gcs_emulator, postgres_database
from synthetic import make_image
from test_trainer_service import brush

SHARED, IMAGES = "appliance-shared", "appliance-images"
N_TASKS = 16


@pytest.fixture(scope="module")
def infra(tmp_path_factory):
    with postgres_database() as database, gcs_emulator(tmp_path_factory.mktemp("gcs"), (SHARED, IMAGES)) as gcs:
        yield database, gcs


@pytest.fixture(scope="module")
def truth(infra) -> dict[str, list[np.ndarray]]:
    rng, found = np.random.default_rng(11), {}
    for i in range(N_TASKS):
        image, objects = make_image(rng, 1, size=(256, 192))
        out = io.BytesIO()
        image.save(out, format="PNG")
        infra[1][1].bucket(IMAGES).blob(f"shapes/shape{i:02d}.png").upload_from_string(out.getvalue(),
                                                                                         content_type="image/png")
        found[f"shape{i:02d}.png"] = [mask for _, _, mask in objects]
    return found


@pytest.fixture(scope="module")
def nodes(infra, truth, tmp_path_factory, artifacts):
    database, (gcs_url, _) = infra
    sam_port, predict_port = free_port(), free_port()
    common = {  # what a ConfigMap and a Secret give every pod
        "APPLIANCE_DATABASE_URL": database, "STORAGE_EMULATOR_HOST": gcs_url,
        "APPLIANCE_SHARED_STATE": f"gs://{SHARED}/site", "APPLIANCE_SHARED_POLL_SECONDS": "2",
        "APPLIANCE_GCS_SOURCE_BUCKET": IMAGES, "APPLIANCE_GCS_SOURCE_PREFIX": "shapes",
        "APPLIANCE_SAMPLE_IMAGES": "false", "APPLIANCE_LABELS": "Object",
        "APPLIANCE_SAM_URL": f"http://127.0.0.2:{sam_port}", "APPLIANCE_PREDICT_URL": f"http://127.0.0.2:{predict_port}",
        "LABEL_STUDIO_API_KEY": secrets.token_hex(16), "LABEL_STUDIO_PASSWORD": secrets.token_urlsafe(12),
        "APPLIANCE_SECRET_KEY": secrets.token_urlsafe(32), "APPLIANCE_BACKEND_SECRET": secrets.token_urlsafe(16),
        "APPLIANCE_TRAIN_MIN_NEW": "12", "APPLIANCE_TRAIN_QUIET_SECONDS": "86400", "APPLIANCE_TRAIN_EPOCHS": "40",
        "APPLIANCE_TRAIN_IMG_SIZE": "192", "APPLIANCE_REPREDICT": "false",
    }
    root = tmp_path_factory.mktemp("nodes")

    def node(name: str, **env: str) -> Appliance:
        app = Appliance(env=appliance_env(root / name, **common, **env), log_path=artifacts / f"multinode-{name}.log")
        app.log_path.write_text("")
        return app

    studio1 = node("studio-1", APPLIANCE_ROLES="studio")
    studio2 = node("studio-2", APPLIANCE_ROLES="studio")
    backends = node("backends", APPLIANCE_ROLES="sam,predict", LABEL_STUDIO_URL=studio1.url,
                    APPLIANCE_SAM_PORT=str(sam_port), APPLIANCE_PREDICT_PORT=str(predict_port))
    trainers = [node(f"trainer-{i}", APPLIANCE_ROLES="train", LABEL_STUDIO_URL=studio2.url) for i in (1, 2)]
    everyone = [backends, studio1, studio2, *trainers]
    try:
        backends.start(ready=lambda: health(backends, "predict") is not None and health(backends, "sam") is not None)
        # Both replicas at once, as a Deployment starts them: they take turns to migrate and bootstrap.
        studio2.proc = subprocess.Popen([sys.executable, "-m", "appliance", "up"], env=studio2.env, cwd=ROOT,
                                        stdout=open(studio2.log_path, "ab"), stderr=subprocess.STDOUT,
                                        start_new_session=True)
        studio1.start(timeout=600)
        wait_for("replica 2's bootstrap", lambda: studio2.state().get("bootstrapped_at"), 600, every=0.5)
        for trainer in trainers:
            trainer.start(ready=lambda t=trainer: (t.data_dir / "trainer" / "status.json").exists())
        yield {"studio-1": studio1, "studio-2": studio2, "backends": backends, "trainers": trainers}
    finally:
        for app in everyone:
            if app.proc and app.proc.poll() is None:
                app.stop()


def health(backends: Appliance, role: str) -> dict | None:
    port = backends.env[f"APPLIANCE_{role.upper()}_PORT"]
    try:
        response = requests.get(f"http://127.0.0.2:{port}/health", timeout=5,
                                auth=("labelstudio", backends.env["APPLIANCE_BACKEND_SECRET"]))
    except requests.RequestException:
        return None
    return response.json() if response.ok else None


def status(app: Appliance) -> dict:
    try:
        return json.loads((app.data_dir / "trainer" / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def shared_objects(gcs, folder: str) -> list[str]:
    return sorted(b.name for b in gcs.bucket(SHARED).list_blobs(prefix=f"site/{folder}/"))


def wait_for(what: str, check, seconds: float, every: float = 2):
    deadline = time.time() + seconds
    while time.time() < deadline:
        found = check()
        if found:
            return found
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def test_roles_on_separate_machines_share_one_database_and_one_bucket(nodes, infra, truth):
    gcs = infra[1][1]
    studio1, studio2, backends = nodes["studio-1"], nodes["studio-2"], nodes["backends"]
    trainers = nodes["trainers"]

    # Both replicas converged one project, one pair of ML connections and one shared journal: nothing twice.
    projects = studio2.api("GET", "/api/projects").json()["results"]
    assert len(projects) == 1
    pid = projects[0]["id"]
    assert studio1.state()["project_id"] == studio2.state()["project_id"] == pid
    assert len(studio1.api("GET", f"/api/ml?project={pid}").json()) == 2
    exports = studio2.api("GET", f"/api/storages/export/gcs?project={pid}").json()
    assert [(s["bucket"], s["prefix"]) for s in exports] == [(SHARED, "site/journal")]
    assert studio2.api("GET", f"/api/storages/export/localfiles?project={pid}").json() == []

    # Annotations submitted through replica 2 land in the shared journal, and every trainer's mirror of it.
    tasks = studio2.api("GET", f"/api/projects/{pid}/export", params={"exportType": "JSON",
                                                                      "download_all_tasks": "true"}).json()
    assert len(tasks) == N_TASKS
    for task in tasks:
        name = next(iter(task["data"].values())).rsplit("/", 1)[-1]
        response = studio2.api("POST", f"/api/tasks/{task['id']}/annotations",
                               json={"result": [brush(m) for m in truth[name]], "was_cancelled": False})
        assert response.status_code == 201, response.text
    assert len(shared_objects(gcs, "journal")) == N_TASKS

    # One trainer runs; the other is refused the lock meanwhile and finds the result up to date afterwards.
    winner = wait_for("a published model", lambda: next(
        (t for t in trainers if status(t).get("last", {}).get("result") == "published"), None), 900)
    loser = trainers[1 - trainers.index(winner)]
    version = status(winner)["last"]["version"]
    started = status(winner)["last_run_started"]
    assert status(loser).get("busy_at", 0) > started, "the other trainer never met the lock"
    # Once the lock is free it counts from what the published model saw: too little new for a run of its own.
    wait_for("the other trainer to find it up to date", lambda: status(loser).get("up_to_date_at", 0) > started, 60)
    assert "last_run_started" not in status(loser) and "last" not in status(loser)  # it never ran
    assert len(list((loser.data_dir / "journal").iterdir())) == N_TASKS  # its mirror of the shared journal
    # The run's images were encoded once, by the training job, and shared with every machine (the run started
    # after 12 annotations: its dataset may hold fewer than all 16 images).
    dataset = status(winner)["dataset"]
    assert len(shared_objects(gcs, "embeddings")) >= dataset["train_images"] + dataset["holdout_images"] >= 12

    # The backends node (another machine) serves what the trainer published, through the shared registry; the
    # version travels with the snapshot of the data it was trained on (`appliance export --version` on any machine).
    files = ("classes.json", "config.py", "dataset-holdout.json", "dataset-train.json", "metrics.json", "weights.pth")
    assert shared_objects(gcs, "models") == ["site/models/current"] + sorted(
        f"site/models/versions/{version}/{f}" for f in files)
    wait_for("the backends node to swap", lambda: (health(backends, "predict") or {}).get("model_version") == version,
             120)
    task = tasks[0]
    project = studio1.api("GET", f"/api/projects/{pid}").json()
    answer = requests.post(f"{backends.env['APPLIANCE_PREDICT_URL']}/predict", timeout=120,
                           auth=("labelstudio", backends.env["APPLIANCE_BACKEND_SECRET"]),
                           json={"tasks": [task], "label_config": project["label_config"]}).json()
    assert answer["results"][0]["model_version"] == version
    assert any(r["type"] == "brushlabels" for r in answer["results"][0]["result"])

    # A trainer killed with -9 mid-run: the serving model and the shared registry stay as they were.
    victim, survivor = trainers
    version = gcs.bucket(SHARED).blob("site/models/current").download_as_text()
    published = {n.split("/")[3] for n in shared_objects(gcs, "models") if "/versions/" in n}
    request_run(victim)
    wait_for("the run to train", lambda: status(victim).get("stage") == "train", 300, every=0.5)
    os.killpg(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait(30)
    time.sleep(5)
    assert (health(backends, "predict") or {}).get("model_version") == version
    assert gcs.bucket(SHARED).blob("site/models/current").download_as_text() == version
    assert {n.split("/")[3] for n in shared_objects(gcs, "models") if "/versions/" in n} == published
    # ... and its lock went with it: the other trainer runs at once when asked.
    before = status(survivor).get("last_run_started", 0)
    request_run(survivor)
    wait_for("the survivor to run", lambda: status(survivor).get("last_run_started", 0) > before, 60)
    last = wait_for("the survivor's run", lambda: status(survivor).get("state") != "running"
                    and status(survivor).get("last", {}).get("result") not in (None, "up to date")
                    and status(survivor)["last"], 600)
    assert last["result"] in ("published", "rejected"), last


def request_run(trainer: Appliance) -> None:
    subprocess.run([sys.executable, "-m", "appliance", "train"], env=trainer.env, cwd=ROOT, check=True,
                   capture_output=True, timeout=60)
