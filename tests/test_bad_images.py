"""Bad image files in the images folder: corrupt, truncated, text with an image name, and a PNG whose header claims
20000 x 20000 pixels. Synced into Label Studio, they must give per-task errors from the prediction backend and a
readable error from a SAM click (no 5xx), and leave both backends healthy for the good images.

Runs on its own appliance: the session appliance's task count is part of other tests' expectations.
"""

from __future__ import annotations

import io
import os
import struct
import time
import zlib

import pytest
import requests
from PIL import Image
from skimage import data as samples

from harness import Appliance
from random_model import random_model

BAD = ("corrupt.png", "truncated.jpg", "notes.png", "huge.png")


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header for a huge image with a few bytes of pixel data: cheap to make, costly to decode."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def bad_files() -> dict[str, bytes]:
    jpeg = io.BytesIO()
    Image.fromarray(samples.astronaut()).save(jpeg, "JPEG")
    return {
        "corrupt.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8,
        "truncated.jpg": jpeg.getvalue()[: len(jpeg.getvalue()) // 3],
        "notes.png": b"these are my notes, not a picture\n" * 20,
        "huge.png": png_claiming(20000, 20000),
    }


@pytest.fixture(scope="module")
def studio(default_appliance):
    return default_appliance  # shared with the other hostile-input tests (conftest.py)


def health(app: Appliance, role: str) -> requests.Response:
    return requests.get(f"{app.backend_url(role)}/health", auth=app.backend_auth, timeout=10)


def all_tasks(app: Appliance) -> list[dict]:
    pid = app.state()["project_id"]
    return app.api("GET", f"/api/tasks?project={pid}&page_size=100").json()["tasks"]


def image_of(task: dict) -> str:
    return next(iter(task["data"].values()))


@pytest.fixture(scope="module")
def bad_tasks(studio) -> list[dict]:
    folder = studio.data_dir / "images" / "bad"
    old = os.umask(0o077)  # the volume stays private (test_attacks checks it on this shared appliance)
    try:
        folder.mkdir(parents=True)
        for name, content in bad_files().items():
            (folder / name).write_bytes(content)
    finally:
        os.umask(old)
    storage = studio.state()["local_storage_id"]
    assert studio.api("POST", f"/api/storages/localfiles/{storage}/sync").status_code in (200, 201)
    deadline = time.time() + 60
    while time.time() < deadline:
        found = [t for t in all_tasks(studio) if "bad" in image_of(t)]
        if len(found) == len(BAD):
            return found
        time.sleep(1)
    pytest.fail(f"the sync made {len(found)} of {len(BAD)} tasks")


@pytest.fixture(scope="module")
def serving(studio) -> str:
    version = random_model(studio.data_dir / "models", ["person", "animal"])
    deadline = time.time() + 120
    while health(studio, "predict").json().get("model_version") != version:
        assert time.time() < deadline, "the prediction backend did not load the model"
        time.sleep(1)
    return version


def wait_sam(app: Appliance, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not health(app, "sam").json().get("ready"):
        assert time.time() < deadline, "SAM did not load"
        time.sleep(1)


def click(app: Appliance, task_id: int) -> requests.Response:
    region = {"type": "keypointlabels", "from_name": "point", "to_name": "image", "original_width": 512,
              "original_height": 512, "is_positive": True,
              "value": {"x": 44.0, "y": 25.0, "width": 0.5, "keypointlabels": ["Person"]}}
    sam = app.state()["ml_backends"]["sam"]
    return app.api("POST", f"/api/ml/{sam}/interactive-annotating",
                   json={"task": task_id, "context": {"result": [region]}})


def test_prediction_backend_answers_a_per_task_error_for_each_bad_image(studio, bad_tasks, serving):
    pid = studio.state()["project_id"]
    config = studio.api("GET", f"/api/projects/{pid}").json()["label_config"]
    good = next(t for t in all_tasks(studio) if "astronaut" in image_of(t))
    tasks = bad_tasks + [good]
    response = requests.post(f"{studio.backend_url('predict')}/predict", auth=studio.backend_auth, timeout=180,
                             json={"tasks": tasks, "label_config": config, "project": f"{pid}.0"})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == len(tasks)
    by_name = {image_of(t).rsplit("/", 1)[-1]: r for t, r in zip(tasks, results)}
    for name in BAD:
        assert "error" in by_name[name] and "result" not in by_name[name], (name, by_name[name])
    assert "over the limit" in by_name["huge.png"]["error"] and "20000x20000" in by_name["huge.png"]["error"]
    assert "not a supported image" in by_name["notes.png"]["error"]
    assert by_name["astronaut.png"]["model_version"] == serving and "error" not in by_name["astronaut.png"]
    assert health(studio, "predict").status_code == 200


def test_sam_click_on_a_bad_image_is_an_error_not_a_5xx(studio, bad_tasks):
    wait_sam(studio)
    for task in bad_tasks:
        response = click(studio, task["id"])
        assert response.status_code < 500, (image_of(task), response.status_code, response.text[:300])
        answer = response.json()["data"]
        assert answer["result"] == [] and answer.get("error"), (image_of(task), answer)
        assert health(studio, "sam").status_code == 200


def test_both_backends_stay_healthy_and_a_good_click_still_works(studio, bad_tasks):
    wait_sam(studio)
    assert health(studio, "sam").status_code == 200 and health(studio, "predict").status_code == 200
    good = next(t for t in all_tasks(studio) if "astronaut" in image_of(t))
    answer = click(studio, good["id"]).json()["data"]
    assert answer["result"] and answer["result"][0]["type"] == "brushlabels", answer


def test_camera_file_names_in_any_case_import(studio):
    """IMG_0001.JPG, SCAN.TIF, photo.Webp: the images folder's filter ignores the extension's case."""
    folder = studio.data_dir / "images" / "camera"
    names = {"IMG_0001.JPG": "JPEG", "SCAN.TIF": "TIFF", "photo.Webp": "WEBP", "Shot.PNG": "PNG"}
    old = os.umask(0o077)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, kind in names.items():
            Image.fromarray(samples.astronaut()[:64, :64]).save(folder / name, kind)
    finally:
        os.umask(old)
    storage = studio.state()["local_storage_id"]
    assert studio.api("POST", f"/api/storages/localfiles/{storage}/sync").status_code in (200, 201)
    deadline = time.time() + 60
    while time.time() < deadline:
        found = {image_of(t).rsplit("/", 1)[-1] for t in all_tasks(studio) if "camera" in image_of(t)}
        if found == set(names):
            return
        time.sleep(1)
    pytest.fail(f"imported {sorted(found)} of {sorted(names)}")
