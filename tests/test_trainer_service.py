"""Labels in, better pre-annotations out: annotations submitted through Label Studio's API become a new model.

Generated photos of filled shapes are imported through the Local Files storage and annotated with brush masks
labelled "Object" through the API. Label Studio writes each one to the journal; the trainer (configured by the
session appliance to start after TRAIN_MIN_NEW annotations) trains, evaluates on held-out tasks, publishes,
and the prediction backend serves the new version, which finds the objects on held-out images.
"""

from __future__ import annotations

import json
import time

import numpy as np
import requests
from PIL import Image

from appliance.models.sam.masks import mask_to_brush_rle
from harness import ROOT, brush_mask  # noqa: F401
from synthetic import make_image

N_TASKS = 16


def import_shapes(appliance) -> dict[str, list[np.ndarray]]:
    folder = appliance.data_dir / "images" / "shapes"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(11)
    truth = {}
    for i in range(N_TASKS):
        image, objects = make_image(rng, 1, size=(256, 192))
        image.save(folder / f"shape{i:02d}.png")
        truth[f"shape{i:02d}.png"] = [mask for _, _, mask in objects]
    storage = appliance.state()["local_storage_id"]
    assert appliance.api("POST", f"/api/storages/localfiles/{storage}/sync").status_code in (200, 201)
    return truth


def shape_tasks(appliance, deadline: float) -> dict[str, dict]:
    pid = appliance.state()["project_id"]
    while time.time() < deadline:
        tasks = appliance.api("GET", f"/api/projects/{pid}/export",
                              params={"exportType": "JSON", "download_all_tasks": "true"}).json()
        found = {next(iter(t["data"].values())).rsplit("/", 1)[-1]: t for t in tasks
                 if "shapes" in next(iter(t["data"].values()))}
        if len(found) == N_TASKS:
            return found
        time.sleep(1)
    raise AssertionError("the storage sync did not create the shape tasks")


def brush(mask: np.ndarray) -> dict:
    height, width = mask.shape
    return {"from_name": "mask", "to_name": "image", "type": "brushlabels", "original_width": width,
            "original_height": height, "image_rotation": 0,
            "value": {"format": "rle", "rle": mask_to_brush_rle(mask), "brushlabels": ["Object"]}}


def trainer_status(appliance) -> dict:
    path = appliance.data_dir / "trainer" / "status.json"
    return json.loads(path.read_text()) if path.exists() else {}


def test_submitted_annotations_become_a_serving_model_that_finds_the_objects(appliance):
    before = trainer_status(appliance).get("last", {}).get("run")
    truth = import_shapes(appliance)
    tasks = shape_tasks(appliance, time.time() + 60)
    for name, task in tasks.items():
        response = appliance.api("POST", f"/api/tasks/{task['id']}/annotations",
                                 json={"result": [brush(m) for m in truth[name]], "was_cancelled": False})
        assert response.status_code == 201, response.text
    journal = list((appliance.data_dir / "journal").glob("*"))
    assert len(journal) >= N_TASKS  # Label Studio wrote every submitted annotation to the journal

    deadline = time.time() + 900
    while time.time() < deadline:
        last = trainer_status(appliance).get("last", {})
        if last.get("run") and last.get("run") != before:
            break
        time.sleep(2)
    assert last.get("result") == "published", last
    version = last["version"]
    assert last["candidate"]["segm_AP50"] > 0 and last["candidate"]["images"] >= 3  # a split big enough to decide

    auth = appliance.backend_auth
    health_url = f"{appliance.backend_url('predict')}/health"
    while requests.get(health_url, auth=auth, timeout=5).json()["model_version"] != version:
        assert time.time() < deadline, "the prediction backend did not swap to the new version"
        time.sleep(1)

    # The project's instructions (Label Studio's "Instructions" button) show what serves, with its held-out figures.
    pid = appliance.state()["project_id"]
    while f"Serving model {version}" not in (appliance.api("GET", f"/api/projects/{pid}").json()
                                            .get("expert_instruction") or ""):
        assert time.time() < deadline, "the instructions never named the serving model"
        time.sleep(1)
    instructions = appliance.api("GET", f"/api/projects/{pid}").json()["expert_instruction"]
    assert f"mask AP50 {last['candidate']['segm_AP50']:.2f}" in instructions
    assert instructions.count("How to label") == 1  # rewritten in place (it said "No model yet" before)

    # The tasks the trainer held out (its rule, see dataset.choose_holdout): the model never trained on them.
    holdout = set(trainer_status(appliance)["dataset"]["holdout_ids"])
    held_out = [(n, t) for n, t in tasks.items() if t["id"] in holdout]
    # The version keeps the exact sets it was trained and evaluated on (`appliance export --version`).
    folder = appliance.data_dir / "models" / "versions" / version
    kept = {split: json.loads((folder / f"dataset-{split}.json").read_text()) for split in ("train", "holdout")}
    assert {i["id"] for i in kept["holdout"]["images"]} == holdout
    assert len(kept["train"]["images"]) == trainer_status(appliance)["dataset"]["train_images"]
    assert not {i["id"] for i in kept["train"]["images"]} & holdout
    assert all(i["annotation_id"] and i["url"] for i in kept["train"]["images"])
    assert len(held_out) >= 2, "the split holds some of the shape tasks out"
    project = appliance.api("GET", f"/api/projects/{appliance.state()['project_id']}").json()
    url = health_url.replace("/health", "/predict")
    classes = set(json.loads((appliance.data_dir / "models" / "versions" / version / "classes.json").read_text()))
    journal_text = "".join(p.read_text() for p in (appliance.data_dir / "journal").glob("*") if p.is_file())
    assert "Object" in classes and all(f'"{label}"' in journal_text for label in classes), classes
    found = 0
    for name, task in held_out:
        result = requests.post(url, auth=auth, timeout=120, json={"tasks": [task], "label_config":
                                                                   project["label_config"]}).json()["results"][0]
        assert result["model_version"] == version
        masks = [r for r in result["result"] if r["type"] == "brushlabels"]
        # Only classes with a training example: a label nobody annotated is never predicted.
        assert {r["value"]["brushlabels"][0] for r in masks} <= classes
        width, height = Image.open(appliance.data_dir / "images" / "shapes" / name).size
        ious = [0.0]
        for region in masks:
            assert (region["original_width"], region["original_height"]) == (width, height)  # the image's size
            predicted = brush_mask(region)
            ious += [np.logical_and(predicted, m).sum() / np.logical_or(predicted, m).sum() for m in truth[name]]
        found += max(ious) > 0.5
    assert found >= len(held_out) - 1, f"found {found} of {len(held_out)} held-out objects at IoU > 0.5"
