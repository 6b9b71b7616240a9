"""The labeling flow in a real browser (Debian's headless Chromium driven by Playwright), against an appliance
started by its entrypoint: log in with the bootstrap credentials, see a pre-annotation from the serving model,
place a smart keypoint and see SAM's mask, submit, and find the annotation through the API.

Runs on its own appliance (its model and annotations must not leak into the other tests). Screenshots land in
test-artifacts/.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import requests
from label_studio_sdk.converter.brush import decode_rle

from harness import Appliance, appliance_env
from synthetic import make_dataset

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]
FACE = (240, 150)  # a point on the astronaut's face (skimage.data.astronaut, 512 x 512)


@pytest.fixture(scope="module")
def studio(tmp_path_factory, artifacts):
    app = Appliance(env=appliance_env(tmp_path_factory.mktemp("browser") / "data", APPLIANCE_SCORE_THRESHOLD="0"),
                    log_path=artifacts / "browser-appliance.log")
    app.log_path.write_text("")
    app.start()
    yield app
    app.stop()


@pytest.fixture(scope="module")
def serving_version(studio, tmp_path_factory) -> str:
    """A tiny model (two training iterations) published to the registry, served by the prediction backend."""
    from appliance.models.detection.train import train
    from appliance.models.registry import ModelRegistry

    root = tmp_path_factory.mktemp("model")
    make_dataset(root / "data", 8, ["Person", "Object"], seed=3)
    model = train(root / "data", ["Person", "Object"], root / "model", epochs=1, batch_size=4, img_size=160)
    version = ModelRegistry(studio.data_dir / "models").publish(Path(model), {})
    url = f"http://127.0.0.2:{studio.env['APPLIANCE_PREDICT_PORT']}/health"
    auth = ("labelstudio", studio.secrets()["APPLIANCE_BACKEND_SECRET"])
    deadline = time.time() + 120
    while requests.get(url, auth=auth, timeout=5).json()["model_version"] != version:
        assert time.time() < deadline, "the prediction backend did not serve the model"
        time.sleep(0.5)
    return version


@pytest.fixture(scope="module")
def browser():
    from playwright import sync_api as playwright

    assert Path(CHROMIUM).exists(), "Chromium is missing: apt-get install chromium (make test installs it)"
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def task_id(studio, name: str) -> int:
    tasks = studio.api("GET", f"/api/projects/{studio.state()['project_id']}/export",
                       params={"exportType": "JSON", "download_all_tasks": "true"}).json()
    return next(t["id"] for t in tasks if name in next(iter(t["data"].values())))


def test_label_a_task_in_the_browser(studio, serving_version, browser, artifacts):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{studio.url}/user/login/")
    page.fill("input[name=email]", "admin@appliance.local")
    page.fill("input[name=password]", studio.secrets()["LABEL_STUDIO_PASSWORD"])
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: "/user/login" not in url, timeout=60000)

    tid = task_id(studio, "astronaut")
    page.goto(f"{studio.url}/projects/{studio.state()['project_id']}/data?task={tid}")
    page.wait_for_selector("text=Auto-Annotation", timeout=120000)
    # The serving model's pre-annotation is offered as a tab named after its version.
    page.get_by_text(serving_version[:8]).first.wait_for(timeout=60000)
    page.screenshot(path=str(artifacts / "browser-1-preannotation.png"))
    # Label on a blank annotation: the tiny test model's low-score regions would cover the whole image.
    page.locator("[aria-label='Create an annotation']").click()
    page.wait_for_timeout(1000)

    page.get_by_text("Auto-Annotation", exact=True).click()
    page.get_by_text("Auto-Accept Suggestions", exact=True).click()
    page.locator(".lsf-tool_smart").first.hover()
    page.locator(".lsf-tool_smart[aria-label=key-point-tool]").click()
    page.locator(".lsf-label__text", has_text="Person").nth(1).click()  # the KeyPointLabels' Person
    image = next(e for e in page.locator("img").all() if (e.bounding_box() or {}).get("width", 0) > 300)
    image.scroll_into_view_if_needed()
    box = image.bounding_box()
    answers = []
    page.on("response", lambda r: answers.append(r) if "interactive-annotating" in r.url else None)
    page.screenshot(path=str(artifacts / "browser-2-before-click.png"))
    # If the first click only focused the canvas, a second one nearby places the keypoint.
    for attempt, (x, y) in enumerate([FACE, (FACE[0] + 12, FACE[1] + 8)]):
        page.mouse.click(box["x"] + box["width"] * x / 512, box["y"] + box["height"] * y / 512)
        deadline = time.time() + 60
        while not answers and time.time() < deadline:
            page.wait_for_timeout(250)
        if answers:
            break
    assert answers, "clicking with the smart keypoint sent no interactive request"
    data = answers[0].json()["data"]
    assert data["result"][0]["type"] == "brushlabels" and data["result"][0]["value"]["brushlabels"] == ["Person"]
    page.wait_for_timeout(1500)  # the accepted mask is drawn
    page.screenshot(path=str(artifacts / "browser-2-sam-mask.png"))

    page.get_by_role("button", name="Submit").click()
    deadline = time.time() + 60
    while not (annotations := studio.api("GET", f"/api/tasks/{tid}/annotations").json()):
        assert time.time() < deadline, "the submitted annotation did not reach Label Studio"
        time.sleep(0.5)
    page.screenshot(path=str(artifacts / "browser-3-submitted.png"))
    masks = [r for r in annotations[0]["result"] if r["type"] == "brushlabels"]
    assert [m["value"]["brushlabels"] for m in masks] == [["Person"]]
    mask = decode_rle(masks[0]["value"]["rle"]).reshape(512, 512, 4)[:, :, 3] >= 128
    assert mask[FACE[1], FACE[0]] or mask[FACE[1] + 8, FACE[0] + 12]  # SAM's mask holds the clicked face
