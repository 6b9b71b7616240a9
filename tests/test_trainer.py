"""The trainer's run: real training subprocess, real evaluation, publish only if better, failures reported.

Datasets come from the synthetic generator through the trainer's build seam (the Label Studio path of the
dataset builder is covered by test_trainer_dataset.py and the end-to-end test in test_trainer_service.py).
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from appliance.models.registry import ModelRegistry
from appliance.settings import load_settings
from appliance.trainer.build import Datasets
from appliance.trainer.dataset import DatasetInfo
from appliance.trainer.schedule import Schedule
from appliance.trainer.service import Trainer, training_lock
from synthetic import make_dataset

LABELS = ["circle", "rectangle"]


def test_schedule_debounces_and_coalesces():
    schedule = Schedule(min_new=5, quiet_seconds=60)
    assert schedule.due(0, None, False, 1000) is None
    assert schedule.due(3, 990, False, 1000) is None  # a burst in progress: wait
    assert schedule.due(3, 930, False, 1000) is not None  # quiet long enough
    assert schedule.due(5, 999, False, 1000) is not None  # enough annotations
    assert schedule.due(0, None, True, 1000) == "requested"


def test_one_run_at_a_time(tmp_path):
    settings = load_settings({"APPLIANCE_DATA_DIR": str(tmp_path)})
    inside, release, second = threading.Event(), threading.Event(), []

    def first():
        with training_lock(settings) as acquired:
            assert acquired
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=first)
    thread.start()
    inside.wait(10)
    with training_lock(settings) as acquired:
        second.append(bool(acquired))
    release.set()
    thread.join()
    assert second == [False]


EPOCHS = 30


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("shapes")
    make_dataset(root / "train", 8, LABELS, seed=5)
    make_dataset(root / "holdout", 4, LABELS, seed=6)
    return root / "train", root / "holdout"


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory) -> Path:
    """One SAM embedding store for the module's runs: each image is encoded once (as in the appliance)."""
    return tmp_path_factory.mktemp("embeddings")


def synthetic_build(train: Path, holdout: Path):
    def build(settings, work):
        info = DatasetInfo(images=8, objects=1)
        return Datasets(train, holdout, LABELS, info, DatasetInfo(images=4, objects=1))
    return build


def trainer_for(tmp_path: Path, build, embeddings: Path | None = None, **env: str) -> Trainer:
    settings = load_settings({"APPLIANCE_DATA_DIR": str(tmp_path), "APPLIANCE_TRAIN_EPOCHS": str(EPOCHS),
                              "APPLIANCE_TRAIN_IMG_SIZE": "160", "APPLIANCE_REPREDICT": "false",
                              # nothing else runs beside these runs: both cores (SAM decodes most of a run)
                              "APPLIANCE_TRAIN_THREADS": "2", **env})
    if embeddings is not None and not settings.embeddings_dir.exists():
        settings.embeddings_dir.parent.mkdir(parents=True, exist_ok=True)
        settings.embeddings_dir.symlink_to(embeddings)
    return Trainer(settings, build=build)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, shapes, embeddings) -> tuple[Path, dict, dict]:
    """One real first run (auto: sam-prompt on the shapes, a few per image), shared: its data folder, its outcome
    and the status after it."""
    data = tmp_path_factory.mktemp("first-run")
    trainer = trainer_for(data, synthetic_build(*shapes), embeddings)
    return data, trainer.run("first"), trainer.status.read()


def serving_copy(first_run, tmp_path: Path) -> str:
    """The first run's registry, copied into this test's data folder; returns the serving version."""
    shutil.copytree(first_run[0] / "models", tmp_path / "models", symlinks=True)
    return first_run[1]["version"]


def test_first_model_is_published_with_its_metrics_and_progress(first_run):
    data, outcome, status = first_run
    assert outcome["result"] == "published", outcome
    current = ModelRegistry(data / "models").current()
    assert current.version == outcome["version"]
    assert {"segm_mAP", "bbox_mAP", "segm_AP50", "train_images", "thresholds", "cost"} <= set(current.metrics)
    # Published because its pre-annotations save the annotator actions on the held-out shapes, with the thresholds
    # that cost least stored beside it.
    spent = current.metrics["cost"]
    assert spent["photos"] == 4 and spent["actions"] < spent["sam_only"] and spent["kept"] > 0
    assert set(current.metrics["thresholds"]) <= set(LABELS) and current.metrics["thresholds"]
    assert outcome["why"].startswith("saves ")
    assert status["state"] == "idle" and status["last"]["result"] == "published" and status["arch"] == "sam-prompt"
    assert status["max_epochs"] == EPOCHS and status["loss"] is not None and status["eta_s"] is not None


def test_first_model_that_saves_nothing_is_not_published_and_the_status_says_why(tmp_path, shapes):
    # RTMDet from scratch, one epoch at the recipe's learning rate for a batch of 4: it finds nothing yet.
    trainer = trainer_for(tmp_path, synthetic_build(*shapes), APPLIANCE_TRAIN_ARCH="rtmdet-ins-tiny",
                          APPLIANCE_TRAIN_EPOCHS="1")
    outcome = trainer.run("first")
    assert outcome["result"] == "rejected" and "would cost more than it saves" in outcome["why"], outcome
    assert ModelRegistry(tmp_path / "models").current() is None
    assert trainer.status.read()["last"]["why"] == outcome["why"]


def junk(train: Path, out: Path) -> Path:
    """The training shapes with every label moved off its object onto empty background: a real model trained on
    it detects junk."""
    shutil.copytree(train, out)
    coco = json.loads((out / "annotations.json").read_text())
    for annotation in coco["annotations"]:
        image = next(i for i in coco["images"] if i["id"] == annotation["image_id"])
        x, y, w, h = annotation["bbox"]
        x, y = (x + image["width"] / 2) % (image["width"] - w), (y + image["height"] / 2) % (image["height"] - h)
        annotation["bbox"] = [x, y, w, h]
        annotation["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
        annotation["area"] = w * h
    (out / "annotations.json").write_text(json.dumps(coco))
    return out


def test_a_model_trained_on_wrong_boxes_is_not_published_and_the_status_says_it_costs_more(tmp_path, shapes,
                                                                                          embeddings):
    # sam-det: its boxes follow the labels. (sam-prompt's masks are SAM's, objects wherever they are: trained on
    # these labels it still finds the shapes, and would rightly be published if it saved actions.)
    trainer = trainer_for(tmp_path, synthetic_build(junk(shapes[0], tmp_path / "junk"), shapes[1]), embeddings,
                          APPLIANCE_TRAIN_ARCH="sam-det")
    outcome = trainer.run("junk")
    assert outcome["result"] == "rejected" and "would cost more than it saves" in outcome["why"], outcome
    spent = outcome["candidate"]["cost"]
    assert spent["kept"] == 0 and spent["actions"] >= spent["sam_only"]
    assert ModelRegistry(tmp_path / "models").current() is None
    assert trainer.status.read()["last"]["why"] == outcome["why"]


def test_worse_candidate_is_not_published(tmp_path, shapes, embeddings, first_run):
    serving = serving_copy(first_run, tmp_path)
    registry = ModelRegistry(tmp_path / "models")
    trainer = trainer_for(tmp_path, synthetic_build(*shapes), embeddings)
    assert registry.current().version == serving
    # The serving model's real held-out figures, then the decision about a candidate costing more than they do.
    current = registry.current().metrics
    costlier = {**current, "cost": {**current["cost"], "actions": current["cost"]["actions"] + 1}}
    outcome = trainer._decide(tmp_path / "nowhere", {"candidate": costlier, "current": current}, None)
    assert "saves no more than the serving model" in outcome["why"], outcome
    assert outcome["result"] == "rejected" and registry.current().version == serving
    assert len(registry.list()) == 1


def test_crash_in_training_leaves_serving_intact_and_is_reported(tmp_path, shapes, first_run):
    serving = serving_copy(first_run, tmp_path)
    registry = ModelRegistry(tmp_path / "models")
    broken = tmp_path / "broken"
    (broken / "images").mkdir(parents=True)
    (broken / "annotations.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "missing.png",
                                                                      "width": 64, "height": 64}],
                                                         "annotations": [], "categories": []}))
    crashing = trainer_for(tmp_path, synthetic_build(broken, shapes[1]))
    outcome = crashing.run("crash")
    assert outcome["result"] == "failed" and "training job failed" in outcome["error"]
    assert registry.current().version == serving and len(registry.list()) == 1
    status = crashing.status.read()
    assert status["state"] == "failed" and status["error"] == outcome["error"]


def test_pretrained_weights_are_fine_tuned_through_the_label_map(tmp_path, shapes):
    """APPLIANCE_DETECTOR_WEIGHTS (a full MMDetection checkpoint, other class names) start the run: classes
    mapped by APPLIANCE_LABEL_MAP or by name carry their head rows over; the rest of the network loads as is."""
    import torch

    from appliance.labelstudio.labeling import parse
    from appliance.models.detection.train import train
    from appliance.trainer import init
    from random_model import random_model

    source = ModelRegistry(tmp_path / "source").path(random_model(tmp_path / "source", ["person", "Circle", "car"]))
    weights = torch.load(source / "weights.pth", weights_only=True)["state_dict"]
    checkpoint = tmp_path / "coco.pth"  # as MMDetection saves them: training state beside the weights
    torch.save({"meta": {"epoch": 300, "dataset_meta": {"classes": ("person", "Circle", "car")}},
                "state_dict": weights, "message_hub": {"log_dir": Path("/runs/coco")}}, checkpoint)
    settings = load_settings({"APPLIANCE_DATA_DIR": str(tmp_path / "data"),
                              "APPLIANCE_DETECTOR_WEIGHTS": str(checkpoint),
                              "APPLIANCE_DETECTOR_CLASSES": "person,Circle,car",
                              "APPLIANCE_LABEL_MAP": "car:rectangle"})
    assert settings.train_arch == "rtmdet-ins-tiny"  # the weights' architecture unless another is asked for
    spec = parse('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
                 '<Label value="circle"/><Label value="rectangle"/></BrushLabels></View>')
    labels_of = init.class_labels(settings, spec)
    fields = init.init_fields(settings, None, LABELS, labels_of)
    assert fields == {"init": checkpoint, "init_classes": ["person", "Circle", "car"], "init_trusted": True,
                      "class_map": {"circle": "Circle", "rectangle": "car"}}

    out = tmp_path / "model"
    train(shapes[0], LABELS, out, arch="rtmdet-ins-tiny", epochs=1, img_size=64, lr=0, init_weights=fields["init"],
          init_classes=fields["init_classes"], class_map=fields["class_map"], init_trusted=fields["init_trusted"])
    after = torch.load(out / "weights.pth", weights_only=True)["state_dict"]
    for level in range(3):
        rows = after[f"bbox_head.rtm_cls.{level}.weight"]
        assert torch.equal(rows[0], weights[f"bbox_head.rtm_cls.{level}.weight"][1])  # circle <- Circle
        assert torch.equal(rows[1], weights[f"bbox_head.rtm_cls.{level}.weight"][2])  # rectangle <- car
    assert torch.equal(after["backbone.stem.0.conv.weight"], weights["backbone.stem.0.conv.weight"])
    # And the serving model's classes read as the project's labels when it is evaluated.
    assert init.labels_for(source, labels_of) == \
        {"person": None, "Circle": "circle", "car": "rectangle"}
