"""The security review's findings 1-4 and 6, tried again against a running appliance, as an attacker with an
account in the project would (here with the admin token: the strongest such account).

A loopback listener plays the attacker's server on a port that is neither Label Studio nor a backend: it records
every request it gets. Runs on its own appliance: it adds tasks and storages other tests do not expect.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from harness import Appliance
from random_model import random_model


class Recorder(BaseHTTPRequestHandler):
    seen: list[tuple[str, str | None]] = []

    def log_message(self, *args) -> None:
        pass

    def _record(self) -> None:
        Recorder.seen.append((self.path, self.headers.get("Authorization")))
        body = b'[{"data": {"image": "/data/upload/x.png"}}]'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _record  # noqa: N815


@pytest.fixture(scope="module")
def attacker():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def studio(default_appliance):
    return default_appliance  # shared with the other hostile-input tests (conftest.py)


@pytest.fixture(scope="module")
def serving(studio) -> str:
    """A model is served, so the prediction backend really fetches task images."""
    old = os.umask(0o077)  # as `appliance model import` would write it (the CLI runs with the appliance's umask)
    try:
        version = random_model(studio.data_dir / "models", ["object"])
    finally:
        os.umask(old)
    deadline = time.time() + 120
    while studio.backend_health("predict").get("model_version") != version:
        assert time.time() < deadline, "the prediction backend did not load the model"
        time.sleep(1)
    return version


def leaked(app: Appliance) -> list[tuple[str, str | None]]:
    return [entry for entry in Recorder.seen if entry[1] and app.token in entry[1]]


def test_backslash_image_url_never_carries_the_token_elsewhere(studio, attacker, serving):
    """Finding 1: a task image URL that urlsplit and urllib3 read as two different hosts, tried through every
    path that fetches images: SAM prefetch (no click), a SAM click through Label Studio, a direct predict call
    and Label Studio's "Retrieve predictions"."""
    Recorder.seen.clear()
    project = studio.state()["project_id"]
    url = f"http://127.0.0.1:{attacker}\\@127.0.0.1:{studio.env['APPLIANCE_PORT']}/backslash.png"
    created = studio.api("POST", f"/api/projects/{project}/import", json=[{"image": url}])
    assert created.status_code == 201, created.text
    task = studio.api("GET", f"/api/tasks?project={project}&page_size=200").json()["tasks"]
    task = next(t for t in task if t["data"].get("image") == url)
    studio.wait_backend_ready("sam")
    sam_id = studio.state()["ml_backends"]["sam"]
    click = {"type": "keypointlabels", "from_name": "point", "to_name": "image", "original_width": 512,
             "original_height": 512, "is_positive": True,
             "value": {"x": 44.0, "y": 25.0, "width": 0.5, "keypointlabels": ["Object"]}}
    config = studio.api("GET", f"/api/projects/{project}").json()["label_config"]
    through_studio = studio.api("POST", f"/api/ml/{sam_id}/interactive-annotating",
                                json={"task": task["id"], "context": {"result": [click]}})
    assert through_studio.status_code < 500
    for role in ("predict", "sam"):
        direct = requests.post(f"{studio.backend_url(role)}/predict", auth=studio.backend_auth, timeout=60,
                               json={"tasks": [task], "project": f"{project}.1", "label_config": config,
                                     "params": {"context": {"result": [click]}} if role == "sam" else {}})
        assert direct.status_code == 200, direct.text
        assert "backslash" in direct.text or "refusing" in direct.text  # the task fails, the service answers
    retrieve = studio.api("POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={project}",
                          json={"selectedItems": {"all": False, "included": [task["id"]]}})
    assert retrieve.status_code == 200
    studio.wait_prefetch_idle()  # the prefetch the clicks above queued has run (no fixed sleep)
    assert leaked(studio) == []
    assert Recorder.seen == []  # refused before any connection: the URL is ambiguous


@pytest.mark.parametrize("folder", ["", "label-studio", "journal", "models", "run", "trainer", "cache", "files"])
def test_local_files_storage_only_over_images(studio, folder):
    """Finding 2: no Local Files storage over the data volume's private folders; the database stays private."""
    project = studio.state()["project_id"]
    path = studio.data_dir / folder if folder else studio.data_dir
    path.mkdir(mode=0o700, exist_ok=True)
    response = studio.api("POST", "/api/storages/localfiles", json={"project": project, "path": str(path),
                                                                     "use_blob_urls": True, "title": "x"})
    assert response.status_code == 400, (folder, response.text)
    assert "LOCAL_FILES_DOCUMENT_ROOT" in response.text


def test_database_cannot_be_downloaded_and_images_still_can(studio):
    for d in ("label-studio/label_studio.sqlite3", "../label-studio/label_studio.sqlite3", "../secrets.env",
              "images/../../label-studio/label_studio.sqlite3", "../journal"):
        response = studio.api("GET", f"/data/local-files/?d={d}")
        # 403/404, or Label Studio's own 500 for a path that climbs out of the document root (safe_join)
        assert response.status_code in (403, 404, 500) and b"SQLite format" not in response.content, d
    project = studio.state()["project_id"]
    tasks = studio.api("GET", f"/api/tasks?project={project}&page_size=5").json()["tasks"]
    local = next(t["data"]["image"] for t in tasks if "local-files" in str(t["data"].get("image")))
    image = studio.api("GET", local[local.index("/data/"):])
    assert image.status_code == 200 and image.headers["Content-Type"].startswith("image/")
    # An images subfolder is a valid storage: the document root holds images, not nothing.
    sub = studio.data_dir / "images" / "more"
    sub.mkdir(mode=0o700, exist_ok=True)
    response = studio.api("POST", "/api/storages/localfiles", json={
        "project": project, "path": str(studio.data_dir / "files" / "images" / "more"), "title": "more"})
    assert response.status_code == 201, response.text


def test_label_studio_does_not_call_other_loopback_ports(studio, attacker):
    """Finding 4: import from URL, webhooks and ML backends at a loopback port that is not a backend."""
    Recorder.seen.clear()
    project = studio.state()["project_id"]
    target = f"http://127.0.0.1:{attacker}"
    imported = studio.api("POST", f"/api/projects/{project}/import", data={"url": f"{target}/tasks.json"})
    assert imported.status_code in (400, 403) and "reserved network address" in imported.text, imported.text
    hook = studio.api("POST", "/api/webhooks/", json={"project": project, "url": f"{target}/hook"})
    assert hook.status_code in (400, 403) and "reserved network address" in hook.text, hook.text
    ml = studio.api("POST", "/api/ml", json={"project": project, "url": target, "title": "evil"})
    assert ml.status_code in (400, 403) and "reserved network address" in ml.text, ml.text
    time.sleep(1)
    assert Recorder.seen == []
    # The backends' own address is the one exception, and it still works.
    backends = studio.api("GET", f"/api/ml?project={project}").json()
    assert len(backends) == 2 and all(b["state"] == "CO" for b in backends), backends


def test_data_volume_is_private(studio):
    """Finding 6: folders 0700, files 0600, the database and its WAL included."""
    db = studio.data_dir / "label-studio" / "label_studio.sqlite3"
    # SQLite drops the WAL when the last connection closes (Label Studio's close after each request): a reader held
    # open here keeps the WAL and shared-memory files there to be checked. SQLite gives them the database's mode,
    # whichever process creates them.
    with contextlib.closing(sqlite3.connect(db)) as reader:
        reader.execute("SELECT count(*) FROM django_migrations").fetchone()
        assert (db.parent / "label_studio.sqlite3-wal").exists(), "Label Studio's database is not in WAL mode"
        loose = _loose_modes(studio.data_dir)
    assert loose == [], loose


def _loose_modes(data_dir) -> list[tuple[str, str]]:
    """Files not 0600 and folders not 0700 under ``data_dir`` (links and sockets aside)."""
    loose = []
    for folder, dirs, files in os.walk(data_dir):
        for name in [folder] + [os.path.join(folder, f) for f in files]:
            info = os.lstat(name)
            if stat.S_ISLNK(info.st_mode) or stat.S_ISSOCK(info.st_mode):
                continue
            wanted = 0o700 if stat.S_ISDIR(info.st_mode) else 0o600
            if stat.S_IMODE(info.st_mode) != wanted:
                loose.append((name, oct(stat.S_IMODE(info.st_mode))))
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(folder, d))]
    return loose
