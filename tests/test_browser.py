"""The labeling flow in a real browser (Debian's headless Chromium driven by Playwright), against an appliance
started by its entrypoint. The annotator's path, counting wasted clicks (a click on the image that reaches no model
must never happen): log in, see the serving model's pre-annotation and the model loop in the instructions, set
the two per-browser settings the instructions name, click an object (a mask), click a second object of the same
label (a second, separate mask), alt-click inside the first mask (it shrinks; the second is untouched), accept,
submit, find the two masks through the API, click on the next task, and click in a box-only project (a tight box).

Runs on its own appliance (its model and annotations must not leak into the other tests). Screenshots land in
test-artifacts/.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from playwright.sync_api import Error as PlaywrightError

from harness import Appliance, appliance_env, brush_mask
from random_model import random_model

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]
FACE = (240, 150)  # a point on the astronaut's face (skimage.data.astronaut, 512 x 512)
HELMET = (390, 420)  # the helmet at the bottom right
CAT_EYE = (170, 112)  # chelsea's left eye (skimage.data.chelsea, 451 x 300)


@pytest.fixture(scope="module")
def studio(tmp_path_factory, artifacts):
    app = Appliance(env=appliance_env(tmp_path_factory.mktemp("browser") / "data", APPLIANCE_SCORE_THRESHOLD="0"),
                    log_path=artifacts / "browser-appliance.log")
    app.log_path.write_text("")
    app.start()
    yield app
    app.stop()


@pytest.fixture(scope="module")
def serving_version(studio) -> str:
    """A model with random weights (the UI path needs a served version, not a good one), published to the
    registry and served by the prediction backend."""
    version = random_model(studio.data_dir / "models", ["Person", "Object"], max_per_img=10)
    url = f"{studio.backend_url('predict')}/health"
    auth = studio.backend_auth
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


def task_id(studio, name: str, project: int | None = None) -> int:
    tasks = studio.api("GET", f"/api/projects/{project or studio.state()['project_id']}/export",
                       params={"exportType": "JSON", "download_all_tasks": "true"}).json()
    return next(t["id"] for t in tasks if name in next(iter(t["data"].values())))


def box_only_project(studio) -> int:
    """A second project as users bring it: boxes only (RectangleLabels), a smart keypoint, the same SAM backend."""
    config = ('<View><Image name="image" value="$image"/><RectangleLabels name="face" toName="image">'
              '<Label value="Face"/></RectangleLabels><KeyPointLabels name="point" toName="image" smart="true" '
              'smartOnly="true"><Label value="Face" hotkey="1" smart="true"/></KeyPointLabels></View>')
    project = studio.api("POST", "/api/projects", json={"title": "Faces", "label_config": config}).json()
    source = studio.api("GET", f"/api/tasks/{task_id(studio, 'astronaut')}").json()["data"]
    studio.api("POST", f"/api/projects/{project['id']}/import", json=[{"image": next(iter(source.values()))}])
    sam = studio.api("GET", f"/api/ml/{studio.state()['ml_backends']['sam']}").json()
    studio.api("POST", "/api/ml", json={
        "project": project["id"], "url": sam["url"], "title": "SAM", "is_interactive": True,
        "auth_method": "BASIC_AUTH", "basic_auth_user": "labelstudio",
        "basic_auth_pass": studio.secrets()["APPLIANCE_BACKEND_SECRET"]}).raise_for_status()
    return project["id"]


class Annotator:
    """Clicks on the image as an annotator does; every canvas click must reach SAM and change what is drawn."""

    def __init__(self, page, artifacts: Path):
        self.page, self.artifacts = page, artifacts
        self.answers: list = []
        self.clicks = self.wasted = 0
        page.on("response", lambda r: self.answers.append(r) if "interactive-annotating" in r.url else None)

    def open(self, url: str) -> None:
        self.page.goto(url)
        self.page.wait_for_selector("text=Auto-Annotation", timeout=120000)
        self.page.wait_for_timeout(1500)

    def image_box(self) -> dict:
        image = next(e for e in self.page.locator("img").all() if (e.bounding_box() or {}).get("width", 0) > 300)
        return image.bounding_box()

    def smart_keypoint(self, key: str = "1") -> None:
        """The smart keypoint tool (Label Studio keeps it selected across tasks) and a label by its key."""
        page = self.page
        if not page.locator(".lsf-tool_smart[aria-label=key-point-tool].lsf-tool_active").count():
            page.locator(".lsf-tool_smart").first.hover()
            page.locator(".lsf-tool_smart[aria-label=key-point-tool]").click()
        if not page.locator(".lsf-label_selected").count():
            page.evaluate("document.activeElement && document.activeElement.blur()")  # keys go to the editor
            page.keyboard.press(key)
        assert page.locator(".lsf-label_selected").count() == 1

    def click(self, x: float, y: float, size: tuple[int, int] = (512, 512), negative: bool = False,
              shot: str = "") -> dict | None:
        """Click at (x, y) of a width x height image; the backend's answer, or None when the click was wasted."""
        page, box, before = self.page, self.image_box(), len(self.answers)
        self.clicks += 1
        at = (box["x"] + box["width"] * x / size[0], box["y"] + box["height"] * y / size[1])
        page.mouse.move(*at)
        if negative:
            page.keyboard.down("Alt")
        page.mouse.click(*at)
        if negative:
            page.keyboard.up("Alt")
        deadline = time.time() + 60
        while len(self.answers) == before and time.time() < deadline:
            page.wait_for_timeout(200)
        page.wait_for_timeout(800)  # the answer is drawn
        if shot:
            page.screenshot(path=str(self.artifacts / f"browser-{shot}.png"))
        if len(self.answers) == before:
            self.wasted += 1
            return None
        return self.answers[-1].json()["data"]


def masks_of(data: dict | None) -> list[np.ndarray]:
    regions = [r for r in (data or {}).get("result", []) if r["type"] == "brushlabels"]
    return [brush_mask(r) for r in regions]


def test_the_annotators_path_wastes_no_click(studio, serving_version, browser, artifacts):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{studio.url}/user/login/")
    page.fill("input[name=email]", "admin@appliance.local")
    page.fill("input[name=password]", studio.secrets()["LABEL_STUDIO_PASSWORD"])
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: "/user/login" not in url, timeout=60000)
    pid = studio.state()["project_id"]
    annotator = Annotator(page, artifacts)

    annotator.open(f"{studio.url}/projects/{pid}/data?task={task_id(studio, 'astronaut')}")
    # The serving model's pre-annotation is offered as a tab named after its version.
    page.get_by_text(serving_version[:8]).first.wait_for(timeout=60000)
    page.screenshot(path=str(artifacts / "browser-1-preannotation.png"))
    # The instructions show the model loop: the trainer wrote the serving version into them.
    deadline = time.time() + 60
    while serving_version not in (studio.api("GET", f"/api/projects/{pid}").json().get("expert_instruction") or ""):
        assert time.time() < deadline, "the instructions never named the serving model"
        time.sleep(1)
    page.reload()
    page.wait_for_selector("text=Auto-Annotation", timeout=120000)
    page.get_by_role("button", name="Instructions").click()
    shown = page.get_by_text(f"Serving model {serving_version}").first
    shown.wait_for(timeout=30000)
    page.wait_for_timeout(1000)  # the modal fades in
    page.screenshot(path=str(artifacts / "browser-2-instructions.png"))
    assert shown.is_visible() and page.get_by_text("Keep label selected after creating a region").first.is_visible()
    close_modal(page)

    # Once per browser, as the instructions say: Auto-Annotation on, and keep the label after each region.
    page.locator("[aria-label='Create an annotation']").click()  # a blank annotation, not the tiny model's
    page.get_by_text("Auto-Annotation", exact=True).click()
    wait_stored(page, "localStorage.getItem('autoAnnotation') === 'true'", "Auto-Annotation")
    page.locator(".lsf-bottombar button[aria-label=Settings], button[aria-label=Settings]").last.click()
    title = page.get_by_text("Labeling Interface Settings").first
    title.wait_for(timeout=30000)
    switch_on(page, "Keep label selected after creating a region",
              "JSON.parse(localStorage.getItem('labelStudio:settings') || '{}').continuousLabeling === true")
    close_modal(page)
    page.screenshot(path=str(artifacts / "browser-2-settings-stored.png"))

    annotator.smart_keypoint()
    face = masks_of(annotator.click(*FACE, shot="3-face"))
    assert len(face) == 1 and face[0][FACE[1], FACE[0]]
    both = masks_of(annotator.click(*HELMET, shot="4-second-object"))
    assert len(both) == 2, "a second object of the same label is a second mask"
    assert np.array_equal(both[0], face[0]) and both[1][HELMET[1], HELMET[0]] and not (both[0] & both[1]).any()
    ys, xs = np.nonzero(face[0])
    inside = (int(xs.mean()), int(ys.min() + 0.25 * (ys.max() - ys.min())))  # the upper face, inside the mask
    assert face[0][inside[1], inside[0]]
    cut = masks_of(annotator.click(*inside, negative=True, shot="5-negative"))
    assert len(cut) == 2 and not cut[0][inside[1], inside[0]] and cut[0].sum() != face[0].sum()
    assert np.array_equal(cut[1], both[1])  # the helmet is another object: untouched
    accept_all(page)
    page.get_by_role("button", name="Submit").click()
    tid = task_id(studio, "astronaut")
    deadline = time.time() + 60
    while not (annotations := studio.api("GET", f"/api/tasks/{tid}/annotations").json()):
        assert time.time() < deadline, "the submitted annotation did not reach Label Studio"
        time.sleep(0.5)
    page.screenshot(path=str(artifacts / "browser-6-submitted.png"))
    masks = [r for r in annotations[0]["result"] if r["type"] == "brushlabels"]
    assert [m["value"]["brushlabels"] for m in masks] == [["Person"], ["Person"]]

    # The next task: the tool is still the smart keypoint, the first click makes a mask.
    annotator.open(f"{studio.url}/projects/{pid}/data?task={task_id(studio, 'chelsea')}")
    annotator.smart_keypoint()
    assert len(masks_of(annotator.click(*CAT_EYE, size=(451, 300), shot="7-next-task"))) == 1  # chelsea: 451 x 300

    # A box-only project: one click gives a tight rectangle.
    faces = box_only_project(studio)
    annotator.open(f"{studio.url}/projects/{faces}/data?task={task_id(studio, 'astronaut', faces)}")
    annotator.smart_keypoint()
    data = annotator.click(*FACE, shot="8-box-only")
    assert data and [r["type"] for r in data["result"]] == ["rectanglelabels"]
    assert 0 < data["result"][0]["value"]["width"] < 50
    assert annotator.wasted == 0, f"{annotator.wasted} of {annotator.clicks} clicks did nothing"


def close_modal(page) -> None:
    """Escape, then wait until no modal (Label Studio's or the editor's) is visible: a click during the fade-out
    lands on the overlay and does nothing."""
    page.keyboard.press("Escape")
    page.wait_for_function("() => ![...document.querySelectorAll('[class*=modal-ls], .ant-modal-wrap')]"
                           ".some(e => e.offsetParent !== null && getComputedStyle(e).display !== 'none')",
                           timeout=30000)


def switch_on(page, text: str, stored: str) -> None:
    """Turn on the settings toggle labelled ``text`` until ``stored`` holds in the browser. Under load the dialog
    re-renders while it opens: a click can be lost, or land while the toggle is momentarily detached or hidden
    (Playwright then raises); each try is made again until the deadline."""
    label = page.get_by_text(text).first
    toggle = label.locator("xpath=ancestor::*[.//input][1]").locator("input").first
    deadline = time.time() + 60
    while not page.evaluate(stored):
        assert time.time() < deadline, f"the setting {text!r} was not stored"
        try:
            if not toggle.is_checked(timeout=5000):
                toggle.click(force=True, timeout=5000)
        except PlaywrightError:
            try:
                label.click(timeout=5000)  # the text is the toggle's label: clicking it flips the toggle too
            except PlaywrightError:
                pass
        page.wait_for_timeout(1000)


def wait_stored(page, condition: str, what: str) -> None:
    """Label Studio keeps its editor settings in the browser's local storage: wait until ``what`` is stored."""
    deadline = time.time() + 30
    while not page.evaluate(condition):
        assert time.time() < deadline, f"the setting {what!r} was not stored"
        page.wait_for_timeout(200)


def accept_all(page) -> None:
    """Accept the pending masks (the check mark beside "N suggestions")."""
    page.get_by_test_id("bottombar-accept-suggestions-button").click()
    page.wait_for_timeout(800)
    assert not page.get_by_test_id("bottombar-accept-suggestions-button").count()
