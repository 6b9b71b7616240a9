"""MMDetection pipeline end to end: train, publish, load, predict, evaluate.

Trains RTMDet-Ins-tiny for two iterations on a small synthetic set (enough to
prove the pipeline, not to learn). Whether it learns is measured by benchmarks/detector_learning.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from appliance.models.registry import ModelRegistry, UnknownVersionError
from synthetic import make_dataset, make_image

torch = pytest.importorskip("torch")
pytest.importorskip("mmdet")

from appliance.models.detection.evaluate import evaluate  # noqa: E402
from appliance.models.detection.model import Detection, Detector, ModelLoadError  # noqa: E402
from appliance.models.detection.train import train  # noqa: E402

CLASSES = ["circle", "rectangle"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("train")
    make_dataset(directory, 8, CLASSES, seed=1)
    return directory


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("model")
    events: list[dict] = []
    train(dataset, CLASSES, out, arch="rtmdet-ins-tiny", epochs=1, batch_size=4, img_size=160, progress=events.append)
    return out, events


@pytest.fixture(scope="module")
def detector(trained) -> Detector:
    return Detector(trained[0], device="cpu", score_threshold=0.0)


def test_train_writes_model_and_reports_progress(trained):
    out, events = trained
    assert {"config.py", "weights.pth", "classes.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "classes.json").read_text()) == CLASSES
    iters = [e for e in events if e["event"] == "iter"]
    assert [e["iter"] for e in iters] == [1, 2]
    assert all(e["max_iters"] == 2 and e["epoch"] == 1 and e["eta_s"] >= 0 for e in iters)
    assert all(np.isfinite(e["loss"]) for e in iters)
    assert events[-1]["event"] == "done"


def test_predict_from_registry_current(trained, tmp_path):
    registry = ModelRegistry(tmp_path / "models")
    registry.publish(trained[0], {"segm_mAP": 0.0})
    detector = Detector(registry.current().path, device="cpu", score_threshold=0.0)
    image = np.asarray(make_image(np.random.default_rng(3), 2, (200, 150))[0])
    detections = detector.predict(image)
    assert detections, "threshold 0 keeps the untrained model's candidates"
    for det in detections:
        assert isinstance(det, Detection)
        assert det.label in CLASSES and 0.0 <= det.score <= 1.0
        assert det.mask is not None and det.mask.shape == (150, 200) and det.mask.dtype == bool
        x0, y0, x1, y1 = det.bbox
        assert 0 <= x0 <= x1 <= 200 and 0 <= y0 <= y1 <= 150


def test_score_threshold_filters(detector):
    image = np.asarray(make_image(np.random.default_rng(4), 2, (160, 120))[0])
    assert detector.predict(image, score_threshold=1.01) == []
    assert all(d.score >= 0.005 for d in detector.predict(image, score_threshold=0.005))


def test_predict_batch_matches_single(detector):
    rng = np.random.default_rng(5)
    images = [np.asarray(make_image(rng, 2, size)[0]) for size in ((160, 120), (120, 160), (160, 120))]
    batched = detector.predict_batch(images)
    assert len(batched) == 3
    for image, dets in zip(images, batched):
        single = detector.predict(image)
        assert len(dets) == len(single)
        assert all(d.mask.shape == image.shape[:2] for d in dets)
        np.testing.assert_allclose([d.score for d in dets], [d.score for d in single], atol=1e-4)


def test_predict_rejects_non_rgb(detector):
    with pytest.raises(ValueError, match="RGB uint8"):
        detector.predict(np.zeros((10, 10), dtype=np.uint8))


def test_evaluate_returns_map_in_unit_interval(detector, tmp_path):
    make_dataset(tmp_path, 2, CLASSES, seed=9)
    metrics = evaluate(detector, tmp_path / "annotations.json", tmp_path / "images")
    assert set(metrics) == {"bbox_mAP", "segm_mAP", "bbox_AP50", "segm_AP50", "images", "objects"}
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("bbox_mAP", "segm_mAP", "bbox_AP50", "segm_AP50"))
    assert metrics["images"] == 2 and metrics["objects"] > 0


def test_evaluate_perfect_predictions_score_one(tmp_path):
    from PIL import Image
    from pycocotools.coco import COCO

    make_dataset(tmp_path, 3, CLASSES, seed=11)
    gt = COCO(str(tmp_path / "annotations.json"))
    truth = {}
    for image_id, info in gt.imgs.items():
        pixels = np.asarray(Image.open(tmp_path / "images" / info["file_name"]).convert("RGB"))
        truth[pixels.tobytes()] = [
            Detection(gt.cats[a["category_id"]]["name"], 1.0,
                      (a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]),
                      gt.annToMask(a).astype(bool))
            for a in gt.loadAnns(gt.getAnnIds(imgIds=image_id))]

    metrics = evaluate(lambda image: truth[image.tobytes()],
                       tmp_path / "annotations.json", tmp_path / "images")
    assert metrics["bbox_mAP"] > 0.99 and metrics["segm_mAP"] > 0.99
    nothing = evaluate(lambda image: [], tmp_path / "annotations.json", tmp_path / "images")
    assert nothing == {"bbox_mAP": 0.0, "segm_mAP": 0.0, "bbox_AP50": 0.0, "segm_AP50": 0.0,
                       "images": 3, "objects": metrics["objects"]}

    # A pretrained model's own class names read as the project's labels through the label map.
    def renamed(image):
        return [Detection(f"coco-{d.label}", d.score, d.bbox, d.mask) for d in truth[image.tobytes()]]

    assert evaluate(renamed, tmp_path / "annotations.json", tmp_path / "images")["segm_AP50"] == 0.0
    mapped = evaluate(renamed, tmp_path / "annotations.json", tmp_path / "images",
                      label_of={f"coco-{c}": c for c in CLASSES[1:]}.get)
    # Only the mapped classes count: the unmapped one's objects are missed.
    assert 0.0 < mapped["segm_AP50"] < 0.99 and mapped["segm_mAP"] < metrics["segm_mAP"]


def test_corrupt_weights_fail_clearly(trained, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.py", "classes.json"):
        (broken / name).write_bytes((trained[0] / name).read_bytes())
    (broken / "weights.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="cannot load weights"):
        Detector(broken, device="cpu")


def test_weights_of_other_class_count_fail_clearly(trained, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "weights.pth").write_bytes((trained[0] / "weights.pth").read_bytes())
    (other / "classes.json").write_text(json.dumps(CLASSES + ["triangle"]))
    config = (trained[0] / "config.py").read_text().replace("num_classes=2", "num_classes=3")
    (other / "config.py").write_text(config)
    with pytest.raises(ModelLoadError, match="does not match"):
        Detector(other, device="cpu")


def test_train_cli_prints_json_lines(dataset, trained, tmp_path):
    out = tmp_path / "cli"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "appliance.models.detection.train", "--dataset", str(dataset),
         "--out", str(out), "--epochs", "1", "--batch-size", "8", "--img-size", "128",
         "--init-weights", str(trained[0] / "weights.pth")],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [e["event"] for e in events] == ["iter", "done"]
    assert (out / "weights.pth").is_file()


# --- registry ------------------------------------------------------------------------

def _fake_model(directory: Path, tag: str) -> Path:
    directory.mkdir(parents=True)
    for name in ("config.py", "weights.pth", "classes.json"):
        (directory / name).write_text(tag)
    return directory


def test_registry_publish_use_prune(tmp_path):
    registry = ModelRegistry(tmp_path / "models")
    assert registry.current() is None and registry.list() == []
    v1 = registry.publish(_fake_model(tmp_path / "a", "a"), {"segm_mAP": 0.4})
    v2 = registry.publish(_fake_model(tmp_path / "b", "b"), {"segm_mAP": 0.5})
    assert sorted([v1, v2]) == [v1, v2] and v1.startswith("v0001-") and v2.startswith("v0002-")
    current = registry.current()
    assert current.version == v2 and current.metrics == {"segm_mAP": 0.5}
    assert (current.path / "weights.pth").read_text() == "b"
    assert [(i.version, i.is_current) for i in registry.list()] == [(v1, False), (v2, True)]
    assert registry.list()[0].created.tzinfo is not None

    registry.use(v1)  # rollback
    assert registry.current().version == v1
    assert (tmp_path / "models" / "current" / "weights.pth").read_text() == "a"

    v3 = registry.publish(_fake_model(tmp_path / "c", "c"), make_current=False)
    assert registry.current().version == v1
    assert registry.prune(keep=1) == [v2]
    assert [i.version for i in registry.list()] == [v1, v3]
    assert registry.current().version == v1
    assert registry.prune(keep=0) == [v3]
    assert [i.version for i in registry.list()] == [v1]


def test_registry_unknown_version_and_incomplete_source(tmp_path):
    registry = ModelRegistry(tmp_path / "models")
    with pytest.raises(UnknownVersionError, match="unknown model version 'v0009-x'"):
        registry.use("v0009-x")
    with pytest.raises(UnknownVersionError):
        registry.use("../../etc")
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "config.py").write_text("")
    with pytest.raises(FileNotFoundError, match="weights.pth"):
        registry.publish(incomplete, {})
    assert registry.list() == [] and not list((tmp_path / "models" / "versions").iterdir())


def test_registry_concurrent_publishers_get_distinct_versions(tmp_path):
    src = _fake_model(tmp_path / "src", "x")
    code = (f"from appliance.models.registry import ModelRegistry; "
            f"print(ModelRegistry({str(tmp_path / 'models')!r}).publish({str(src)!r}, {{}}))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(4)]
    versions = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert len(set(versions)) == 4
    registry = ModelRegistry(tmp_path / "models")
    assert sorted(i.version for i in registry.list()) == sorted(versions)
    assert registry.current().version in versions
