"""`appliance export` on real masks: nuclei and COCO photos (holes and multi-part objects among them) uploaded and
annotated through Label Studio's API, exported by the real command, read back with pycocotools, Ultralytics'
polygon rule (even-odd fill) and PIL, and compared with what was submitted. `--version` gives back a version's
training set after the annotations were edited and deleted.

Runs on the appliance the hostile-input tests share (conftest.default_appliance): its other tasks carry no
annotation, and the few annotations here stay under its trainer's threshold, so nothing trains."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image
from pycocotools.coco import COCO

from appliance.labelstudio import labeling
from appliance.export.polygons import rasterise
from appliance.models.registry import ModelRegistry
from appliance.models.sam.masks import mask_to_brush_rle
from appliance.trainer.build import Datasets, keep_snapshot
from appliance.trainer.dataset import build_dataset
from harness import ROOT, Appliance
from random_model import random_model

SHARED = ROOT.parent / "shared" / "data"
PHOTOS = {"nuclei": 2, "coco-ccby": ["photo_025.jpg", "photo_026.jpg"]}


def real_photos() -> list[tuple[Path, list[np.ndarray]]]:
    """(image file, its objects' masks) for the chosen photos of both sets."""
    chosen = []
    for name, pick in PHOTOS.items():
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(SHARED / name / "annotations.json"))
        infos = sorted(coco.imgs.values(), key=lambda i: i["file_name"])
        infos = infos[:pick] if isinstance(pick, int) else [i for i in infos if i["file_name"] in pick]
        for info in infos:
            masks = [coco.annToMask(a).astype(bool) for a in coco.loadAnns(coco.getAnnIds(imgIds=info["id"]))
                     if not a.get("iscrowd")]
            chosen.append((SHARED / name / "images" / info["file_name"], [m for m in masks if m.any()]))
    return chosen


def brush(mask: np.ndarray, label: str) -> dict:
    return {"from_name": "mask", "to_name": "image", "type": "brushlabels", "original_width": mask.shape[1],
            "original_height": mask.shape[0], "image_rotation": 0,
            "value": {"format": "rle", "rle": mask_to_brush_rle(mask), "brushlabels": [label]}}


def rings(mask: np.ndarray) -> tuple[int, int]:
    """(outer boundaries, holes) of a mask."""
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    outer = sum(1 for h in hierarchy[0] if h[3] < 0)
    return outer, len(contours) - outer


def uploaded_task(app: Appliance, project_id: int, name: str) -> int:
    """The id of the task made from an uploaded file (Label Studio stores it as <hash>-<name>)."""
    tasks = app.api("GET", f"/api/projects/{project_id}/export",
                    params={"exportType": "JSON", "download_all_tasks": "true"}).json()
    return max(t["id"] for t in tasks if str(t["data"].get("image", "")).endswith(f"-{name}"))


@pytest.fixture(scope="module")
def project(default_appliance):
    """{task id: (image file, masks)} of the tasks this module made and annotated, and the label used."""
    app = default_appliance
    project_id = app.state()["project_id"]
    spec = labeling.parse(app.api("GET", f"/api/projects/{project_id}").json()["label_config"])
    label = spec.labels[spec.require("BrushLabels")][0]
    tasks = {}
    for path, masks in real_photos():
        with path.open("rb") as handle:
            created = app.api("POST", f"/api/projects/{project_id}/import", files={path.name: handle})
        created.raise_for_status()
        task_id = uploaded_task(app, project_id, path.name)
        app.api("POST", f"/api/tasks/{task_id}/annotations",
                json={"result": [brush(m, label) for m in masks], "was_cancelled": False}).raise_for_status()
        tasks[task_id] = (path, masks)
    yield app, tasks, label
    for task_id in tasks:  # the shared appliance's trainer would otherwise train on them after its quiet time
        app.api("DELETE", f"/api/tasks/{task_id}")


def test_coco_export_equals_the_submitted_masks_pixel_for_pixel(project, tmp_path):
    app, tasks, label = project
    done = app.cli("export", "--format", "coco", "--output", str(tmp_path / "coco"), "--include-images")
    assert done.returncode == 0, done.stderr
    assert "0 failed" in done.stdout, done.stdout
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(tmp_path / "coco" / "annotations.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())][0] == label
    differing, objects, holes, parts = 0, 0, 0, 0
    for task_id, (path, masks) in tasks.items():
        info = coco.imgs[task_id]
        with Image.open(path) as original:
            assert (info["width"], info["height"]) == original.size
        exported = [coco.annToMask(a).astype(bool) for a in coco.loadAnns(coco.getAnnIds(imgIds=task_id))]
        assert len(exported) == len(masks)
        for mine, theirs in zip(masks, exported):
            differing += int((mine != theirs).sum())
            outer, inner = rings(mine)
            holes, parts = holes + (inner > 0), parts + (outer > 1)
        objects += len(masks)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=task_id)):
            assert ann["iscrowd"] == 0 and ann["area"] > 0 and len(ann["bbox"]) == 4
        with Image.open(tmp_path / "coco" / "images" / info["file_name"]) as copy:
            assert copy.size == (info["width"], info["height"])
    assert differing == 0 and objects >= 50 and holes >= 2 and parts >= 2, (differing, objects, holes, parts)
    manifest = json.loads((tmp_path / "coco" / "manifest.json").read_text())
    assert manifest["format"] == "coco" and manifest["objects"] >= objects and manifest["failed"] == []


def test_yolo_seg_polygons_redraw_the_masks(project, tmp_path):
    app, tasks, label = project
    done = app.cli("export", "--format", "yolo-seg", "--output", str(tmp_path / "yolo"))
    assert done.returncode == 0, done.stderr
    data = yaml.safe_load((tmp_path / "yolo" / "data.yaml").read_text())
    assert data["names"][0] == label
    ious = []
    for task_id, (_, masks) in tasks.items():
        lines = (tmp_path / "yolo" / "labels" / f"{task_id}.txt").read_text().splitlines()
        assert len(lines) == len(masks)
        height, width = masks[0].shape
        for line, mask in zip(lines, masks):
            values = line.split()
            assert values[0] == "0" and len(values) % 2 == 1
            points = np.array(values[1:], dtype=float).reshape(-1, 2)
            assert (points >= 0).all() and (points <= 1).all()
            drawn = rasterise(points * [width, height], width, height)
            ious.append((drawn & mask).sum() / (drawn | mask).sum())
    # Vertices on boundary pixels and one-pixel bridges: small nuclei lose most, relative to their size.
    assert np.mean(ious) >= 0.9 and min(ious) >= 0.5, (np.mean(ious), min(ious))


def test_predictions_only_with_predictions_and_the_other_tasks_never_break_the_export(project, tmp_path):
    """A task holding only a prediction is exported with --with-predictions (its masks as predicted), left out by
    default; the project's other tasks (the hostile-input tests' images and predictions) fail nothing."""
    app, tasks, label = project
    project_id = app.state()["project_id"]
    path, masks = real_photos()[-1]
    with path.open("rb") as handle:
        app.api("POST", f"/api/projects/{project_id}/import",
                files={"file": (f"predicted-{path.name}", handle)}).raise_for_status()
    task_id = uploaded_task(app, project_id, f"predicted-{path.name}")
    try:
        app.api("POST", "/api/predictions", json={"task": task_id, "model_version": "test", "score": 0.9,
                                                  "result": [brush(m, label) for m in masks[:3]]}).raise_for_status()
        for flag, expected in (("--only-submitted", 0), ("--with-predictions", 3)):
            done = app.cli("export", "--format", "coco", "--output", str(tmp_path / flag), flag)
            assert done.returncode == 0 and "0 failed" in done.stdout, done.stdout + done.stderr
            with contextlib.redirect_stdout(io.StringIO()):
                coco = COCO(str(tmp_path / flag / "annotations.json"))
            exported = [coco.annToMask(a).astype(bool) for a in coco.loadAnns(coco.getAnnIds(imgIds=task_id))]
            assert len(exported) == expected and all((a == b).all() for a, b in zip(masks, exported))
            assert set(tasks) <= set(coco.imgs)
    finally:
        app.api("DELETE", f"/api/tasks/{task_id}")


def test_mask_pngs_hold_instance_and_class_ids(project, tmp_path):
    app, tasks, _ = project
    done = app.cli("export", "--format", "masks", "--output", str(tmp_path / "png"))
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "png" / "classes.json").read_text())["1"]
    for task_id, (_, masks) in tasks.items():
        instances = np.array(Image.open(tmp_path / "png" / "instances" / f"{task_id}.png"))
        classes = np.array(Image.open(tmp_path / "png" / "classes" / f"{task_id}.png"))
        expected = np.zeros(masks[0].shape, dtype=np.uint16)
        for index, mask in enumerate(masks, start=1):
            expected[mask] = index  # the later object wins where two overlap
        assert (instances == expected).all()
        assert ((classes == 1) == (expected > 0)).all()


def test_label_studio_json_and_a_bad_output_folder(project, tmp_path):
    app, tasks, _ = project
    done = app.cli("export", "--format", "label-studio", "--output", str(tmp_path / "ls"))
    assert done.returncode == 0, done.stderr
    exported = {t["id"]: t for t in json.loads((tmp_path / "ls" / "tasks.json").read_text())}
    for task_id, (_, masks) in tasks.items():
        assert len(exported[task_id]["annotations"][0]["result"]) == len(masks)
    refused = app.cli("export", "--format", "coco", "--output", str(tmp_path / "ls"))
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 1 and len(lines) == 1 and "not an empty folder" in lines[0], lines


def test_version_export_is_the_snapshot_even_after_edits(project, tmp_path):
    """A version carries the dataset it was built from: edit one annotation and delete another afterwards, and
    `--version` still gives the set as it was trained on, split included."""
    app, tasks, label = project
    from appliance.labelstudio.images import ImageFetcher
    from appliance.secrets import ensure_secrets
    from appliance.settings import load_settings

    settings = load_settings(app.env)
    ensure_secrets(settings)
    ids = sorted(tasks)
    snapshot = [app.api("GET", f"/api/tasks/{i}").json() for i in ids]
    fetch = ImageFetcher.from_settings(settings).fetch
    work = tmp_path / "run"
    common = dict(labels=[label], fetch=fetch, holdout_percent=0, image_cache=tmp_path / "cache",
                  holdout_ids={ids[-1]})
    train = build_dataset(snapshot, out_dir=work / "train", split="train", **common)
    holdout = build_dataset(snapshot, out_dir=work / "holdout", split="holdout", **common)
    model = ModelRegistry(tmp_path / "scratch").path(random_model(tmp_path / "scratch", [label]))
    keep_snapshot(Datasets(work / "train", work / "holdout", [label], train, holdout), model)
    version = ModelRegistry(settings.models_dir).publish(model, {"train_images": train.images,
                                                                 "train_objects": train.objects,
                                                                 "holdout_images": holdout.images},
                                                         make_current=False)
    listed = app.cli("model", "list").stdout
    assert f"trained on 3 images ({train.objects} objects), held out 1" in listed, listed

    first, last = snapshot[0], snapshot[-1]
    edited = first["annotations"][0]
    app.api("PATCH", f"/api/annotations/{edited['id']}",
            json={"result": edited["result"][:1]}).raise_for_status()
    app.api("DELETE", f"/api/annotations/{last['annotations'][0]['id']}").raise_for_status()

    done = app.cli("export", "--format", "coco", "--output", str(tmp_path / "v"), "--version", version)
    assert done.returncode == 0, done.stderr
    for split, expected in (("train", ids[:-1]), ("holdout", ids[-1:])):
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(tmp_path / "v" / f"{split}.json"))
        assert sorted(coco.imgs) == expected
        for task_id in expected:
            masks = tasks[task_id][1]
            exported = [coco.annToMask(a).astype(bool) for a in coco.loadAnns(coco.getAnnIds(imgIds=task_id))]
            assert len(exported) == len(masks) and all((a == b).all() for a, b in zip(masks, exported))
    now = app.cli("export", "--format", "coco", "--output", str(tmp_path / "now"))
    assert now.returncode == 0, now.stderr
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(tmp_path / "now" / "annotations.json"))
    assert len(coco.getAnnIds(imgIds=first["id"])) == 1 and last["id"] not in coco.imgs
    unknown = app.cli("export", "--format", "coco", "--output", str(tmp_path / "x"), "--version", "v9999")
    assert unknown.returncode == 1 and "v9999" in unknown.stderr


def test_one_polygon_keeps_holes_separate_parts_and_one_pixel_objects():
    from appliance.export.polygons import mask_polygon

    mask = np.zeros((60, 80), dtype=bool)
    mask[10:50, 10:40] = True
    mask[20:30, 20:30] = False  # a hole
    mask[5:15, 50:70] = True  # a second part
    drawn = rasterise(mask_polygon(mask), 80, 60)
    assert not drawn[25, 25] and drawn[10, 60] and (drawn & mask).sum() / (drawn | mask).sum() > 0.98
    for shape in ((slice(3, 4), slice(2, 4)), (slice(3, 4), slice(3, 4))):  # a 2-pixel line, a single pixel
        tiny = np.zeros((10, 10), dtype=bool)
        tiny[shape] = True
        polygon = mask_polygon(tiny)
        assert len(polygon) >= 3 and (rasterise(polygon, 10, 10) == tiny).all()
