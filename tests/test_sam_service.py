"""The SAM backend inside the running appliance: Label Studio's interactive endpoint returns brush masks."""

from __future__ import annotations

import numpy as np
import requests

from harness import brush_mask

ASTRONAUT_FACE = (160, 60, 290, 200)  # x0, y0, x1, y1 around the face in skimage.data.astronaut() (512 x 512)
FACE = (225, 130)


def sam_backend_id(appliance) -> int:
    return appliance.state()["ml_backends"]["sam"]


def task_named(appliance, name: str) -> dict:
    pid = appliance.state()["project_id"]
    tasks = appliance.api("GET", f"/api/tasks?project={pid}&page_size=100").json()["tasks"]
    return next(t for t in tasks if name in next(iter(t["data"].values())))


def keypoint(x: float, y: float, label: str = "Person", positive: bool = True) -> dict:
    return {"type": "keypointlabels", "from_name": "point", "to_name": "image", "original_width": 512,
            "original_height": 512, "image_rotation": 0, "is_positive": positive,
            "value": {"x": x / 512 * 100, "y": y / 512 * 100, "width": 0.5, "keypointlabels": [label]}}


def interactive(appliance, task_id: int, regions: list[dict]) -> requests.Response:
    return appliance.api("POST", f"/api/ml/{sam_backend_id(appliance)}/interactive-annotating",
                         json={"task": task_id, "context": {"result": regions}})


def decode(region: dict) -> np.ndarray:
    return brush_mask(region)


def test_click_through_label_studio_returns_a_brush_mask_on_the_face(appliance):
    appliance.wait_backend_ready("sam")
    url = f"{appliance.backend_url('sam')}/health"
    health = requests.get(url, auth=appliance.backend_auth, timeout=5).json()
    assert health["encoder"] == "openvino", health  # the install's export, on the CPU by default
    task = task_named(appliance, "astronaut")
    response = interactive(appliance, task["id"], [keypoint(*FACE)])
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    region = data["result"][0]
    assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == ["Person"]
    assert region["from_name"] == "mask" and data["model_version"] == "sam-vit_t"
    mask = decode(region)
    assert mask[FACE[1], FACE[0]]
    x0, y0, x1, y1 = ASTRONAUT_FACE
    assert mask[y0:y1, x0:x1].sum() / mask.sum() > 0.9


def test_label_missing_from_the_template_is_a_clear_error(appliance):
    appliance.wait_backend_ready("sam")
    task = task_named(appliance, "astronaut")
    response = interactive(appliance, task["id"], [keypoint(205, 80, label="Giraffe")])
    data = response.json()["data"]
    assert data["result"] == [] and "Giraffe" in data["error"] and "add <Label" in data["error"]


def test_backend_survives_bad_prompts(appliance):
    appliance.wait_backend_ready("sam")
    task = task_named(appliance, "astronaut")
    for regions, words in (([], "no SAM prompt"), ([keypoint(900, 900)], "outside"),
                           ([{"type": "keypointlabels", "value": {}}], "label")):
        data = interactive(appliance, task["id"], regions).json()["data"]
        assert data["result"] == [] and words in data["error"], data
    assert interactive(appliance, task["id"], [keypoint(*FACE)]).json()["data"]["result"]
