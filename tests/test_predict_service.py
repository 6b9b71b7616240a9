"""The prediction backend inside the running appliance, with a model trained here by real mmdet.

The session appliance maps the model class "circle" to the template label "Object" (APPLIANCE_LABEL_MAP) and
knows nothing of "rectangle", which must therefore be dropped.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import requests

from harness import brush_mask
from synthetic import make_dataset

CLASSES = ["circle", "rectangle"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> list[Path]:
    """Two tiny versions (2 training iterations each): enough to predict something, not to be good."""
    from appliance.models.detection.train import train

    data = tmp_path_factory.mktemp("shapes")
    make_dataset(data, 8, CLASSES, seed=3)
    # RTMDet: the backend's serving path for any MMDetection model (sam-det's own tests are in test_samdet.py), and
    # the architecture pretrained checkpoints are imported as.
    first = train(data, CLASSES, tmp_path_factory.mktemp("m1"), arch="rtmdet-ins-tiny", epochs=1, batch_size=4,
                  img_size=160)
    second = train(data, CLASSES, tmp_path_factory.mktemp("m2"), arch="rtmdet-ins-tiny", epochs=1, batch_size=4,
                   img_size=160, init_weights=Path(first) / "weights.pth", seed=1)
    return [Path(first), Path(second)]


def backend(appliance) -> tuple[str, tuple[str, str]]:
    return appliance.backend_url("predict"), appliance.backend_auth


def serving(appliance) -> str:
    url, auth = backend(appliance)
    return requests.get(f"{url}/health", auth=auth, timeout=5).json()["model_version"]


def publish(appliance, model_dir: Path, timeout: float = 120, metrics: dict | None = None) -> str:
    from appliance.models.registry import ModelRegistry

    version = ModelRegistry(appliance.data_dir / "models").publish(model_dir, metrics or {"segm_mAP": 0.0})
    deadline = time.time() + timeout
    while serving(appliance) != version:
        assert time.time() < deadline, f"backend did not swap to {version}"
        time.sleep(0.5)
    return version


def project_tasks(appliance) -> list[dict]:
    pid = appliance.state()["project_id"]
    return appliance.api("GET", f"/api/tasks?project={pid}&page_size=100").json()["tasks"]


def test_no_model_means_no_predictions_and_says_so(appliance):
    url, auth = backend(appliance)
    health = requests.get(f"{url}/health", auth=auth, timeout=5).json()
    if health["model_version"] == "no-model":
        assert "no model yet" in health["message"]
        task = project_tasks(appliance)[0]
        assert appliance.api("GET", f"/api/tasks/{task['id']}").json()["predictions"] == []


def test_predictions_are_stored_by_label_studio_with_mapped_labels(appliance, tiny_models):
    version = publish(appliance, tiny_models[0])
    task = project_tasks(appliance)[1]
    predictions = appliance.api("GET", f"/api/tasks/{task['id']}").json()["predictions"]  # predicted on load
    assert len(predictions) == 1 and predictions[0]["model_version"] == version
    result = predictions[0]["result"]
    assert result, "a model with threshold 0 predicts something"
    labels = {label for region in result for label in region["value"].get(region["type"], [])}
    assert labels == {"Object"}  # circle -> Object; rectangle has no label and is dropped
    # Boxes always; a mask only where the (barely trained) model's mask is not empty.
    assert "rectanglelabels" in {r["type"] for r in result} <= {"brushlabels", "rectanglelabels"}
    assert all(brush_mask(r).any() for r in result if r["type"] == "brushlabels")
    assert 0 <= predictions[0]["score"] <= 1


def scores(appliance, task: dict) -> list[float]:
    """The region scores of the serving model's pre-annotation of ``task``, asked of the backend directly."""
    url, auth = backend(appliance)
    project = appliance.api("GET", f"/api/projects/{appliance.state()['project_id']}").json()
    response = requests.post(f"{url}/predict", auth=auth, timeout=120,
                             json={"tasks": [task], "label_config": project["label_config"]})
    return [r["score"] for r in response.json()["results"][0]["result"]]


def test_a_version_serves_the_thresholds_stored_with_it(appliance, tiny_models):
    """The trainer stores the thresholds it chose beside a version; the backend applies exactly those (the session's
    APPLIANCE_SCORE_THRESHOLD=0 only for versions without any)."""
    publish(appliance, tiny_models[0])
    task = project_tasks(appliance)[3]
    everything = sorted(scores(appliance, task))
    assert everything, "with APPLIANCE_SCORE_THRESHOLD=0 the tiny model pre-annotates something"
    url, auth = backend(appliance)
    for cut, expected in ((everything[-1] + 0.001, []), (everything[0], everything)):
        publish(appliance, tiny_models[0], metrics={"segm_mAP": 0.0, "thresholds": {"circle": cut}})
        assert requests.get(f"{url}/health", auth=auth, timeout=5).json()["thresholds"] == {"circle": cut}
        assert sorted(scores(appliance, task)) == expected


def test_corrupt_image_fails_only_its_task(appliance, tiny_models):
    if serving(appliance) == "no-model":
        publish(appliance, tiny_models[0])
    (appliance.data_dir / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    url, auth = backend(appliance)
    good = project_tasks(appliance)[0]
    tasks = [{"id": 999, "data": {"image": "/data/local-files/?d=images/broken.jpg"}}, good]
    project = appliance.api("GET", f"/api/projects/{appliance.state()['project_id']}").json()
    response = requests.post(f"{url}/predict", auth=auth, timeout=120,
                             json={"tasks": tasks, "label_config": project["label_config"]})
    results = response.json()["results"]
    assert response.status_code == 200 and len(results) == 2
    assert "result" not in results[0] and "999" in results[0]["error"]
    assert "result" in results[1]
    assert requests.get(f"{url}/health", auth=auth, timeout=5).status_code == 200


def test_hot_swap_during_a_stream_of_requests_fails_none(appliance, tiny_models):
    first = publish(appliance, tiny_models[0]) if serving(appliance) == "no-model" else serving(appliance)
    url, auth = backend(appliance)
    project = appliance.api("GET", f"/api/projects/{appliance.state()['project_id']}").json()
    body = {"tasks": [project_tasks(appliance)[2]], "label_config": project["label_config"]}
    seen, failures, stop = [], [], threading.Event()

    def stream():
        while not stop.is_set():
            try:
                response = requests.post(f"{url}/predict", auth=auth, json=body, timeout=120)
                result = response.json()["results"][0]
                seen.append(result["model_version"]) if response.ok and "result" in result else failures.append(
                    response.text[:200])
            except requests.RequestException as error:
                failures.append(str(error))

    threads = [threading.Thread(target=stream) for _ in range(2)]
    for thread in threads:
        thread.start()
    second = publish(appliance, tiny_models[1])
    time.sleep(2)
    stop.set()
    for thread in threads:
        thread.join(120)
    assert failures == []
    assert first in seen and second in seen and seen.index(second) > seen.index(first)


def test_bulk_predict_is_resumable(appliance, tiny_models):
    if serving(appliance) == "no-model":
        publish(appliance, tiny_models[0])
    version = serving(appliance)
    first = appliance.cli("predict", "--all", "--batch", "2")
    assert first.returncode == 0, first.stderr[-2000:]
    pid = appliance.state()["project_id"]
    tasks = appliance.api("GET", f"/api/projects/{pid}/export",
                          params={"exportType": "JSON", "download_all_tasks": "true"}).json()
    predictions = appliance.api("GET", "/api/predictions", params={"project": pid}).json()
    assert {t["id"] for t in tasks} == {p["task"] for p in predictions if p["model_version"] == version}
    again = appliance.cli("predict", "--all")
    assert again.returncode == 0 and f"0 task(s) pre-annotated with {version}" in again.stdout
    assert f"{len(tasks)} already had it" in again.stdout


def test_model_list_and_rollback(appliance, tiny_models):
    from appliance.models.registry import ModelRegistry

    while len(ModelRegistry(appliance.data_dir / "models").list()) < 2:
        publish(appliance, tiny_models[1])
    listing = appliance.cli("model", "list").stdout.splitlines()
    current = next(line.split()[1] for line in listing if line.startswith("*"))
    older = next(line.split()[0] for line in listing if not line.startswith("*"))
    assert appliance.cli("model", "use", older).returncode == 0
    deadline = time.time() + 60
    while serving(appliance) != older:
        assert time.time() < deadline, "backend did not roll back"
        time.sleep(0.5)
    assert current != older
    bad = appliance.cli("model", "use", "v9999-nope")
    assert bad.returncode != 0 and "v9999-nope" in bad.stderr


def test_broken_version_never_replaces_a_working_one(appliance, tiny_models, tmp_path):
    if serving(appliance) == "no-model":
        publish(appliance, tiny_models[0])
    working = serving(appliance)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.py", "classes.json"):
        (broken / name).write_bytes((tiny_models[0] / name).read_bytes())
    (broken / "weights.pth").write_bytes(b"not a checkpoint")
    from appliance.models.registry import ModelRegistry

    bad = ModelRegistry(appliance.data_dir / "models").publish(broken, {})
    url, auth = backend(appliance)
    deadline = time.time() + 60
    while bad not in str(requests.get(f"{url}/health", auth=auth, timeout=5).json().get("error")):
        assert time.time() < deadline, "the backend did not report the broken version"
        time.sleep(0.5)
    assert serving(appliance) == working
    assert appliance.cli("model", "use", working).returncode == 0


def test_pretrained_weights_import_as_a_version(appliance, tiny_models):
    out = appliance.cli("model", "import", "--weights", str(tiny_models[1] / "weights.pth"),
              "--classes", ",".join(CLASSES))
    assert out.returncode == 0, out.stderr[-2000:]
    version = out.stdout.split()[-1]
    deadline = time.time() + 120
    while serving(appliance) != version:
        assert time.time() < deadline, f"backend did not serve the imported {version}"
        time.sleep(0.5)
    missing = appliance.cli("model", "import", "--weights", "/nonexistent.pth")
    assert missing.returncode != 0 and "not found" in missing.stderr
    # Weights that do not fit the classes given are refused before they become a version.
    versions = appliance.cli("model", "list").stdout
    misfit = appliance.cli("model", "import", "--weights", str(tiny_models[1] / "weights.pth"),
                 "--classes", "a,b,c,d,e")
    assert misfit.returncode != 0 and "does not match" in misfit.stderr, misfit.stderr[-2000:]
    assert appliance.cli("model", "list").stdout == versions and serving(appliance) == version
