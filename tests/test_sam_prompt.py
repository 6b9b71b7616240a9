"""sam-prompt on real photos (tests/data/coco-person: nine CC BY photos with COCO's person masks) and the real
MobileSAM weights: trained through mmengine's Runner on six photos, it finds people on the three it never saw, with
SAM's masks at each photo's exact size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from appliance.models.sam.annotator import iou
from appliance.models.sam.cache import content_key

torch = pytest.importorskip("torch")
pytest.importorskip("mmdet")

DATA = Path(__file__).resolve().parent / "data" / "coco-person"
TRAIN = ("photo_009.jpg", "photo_017.jpg", "photo_019.jpg", "photo_026.jpg", "photo_034.jpg", "photo_055.jpg")
UNSEEN = ("photo_076.jpg", "photo_080.jpg", "photo_097.jpg")


def _subset(files: tuple[str, ...], out: Path) -> Path:
    coco = json.loads((DATA / "annotations.json").read_text())
    images = [dict(i, content_key=content_key((DATA / "images" / i["file_name"]).read_bytes()))
              for i in coco["images"] if i["file_name"] in files]
    ids = {i["id"] for i in images}
    (out / "images").mkdir(parents=True)
    for info in images:
        (out / "images" / info["file_name"]).symlink_to(DATA / "images" / info["file_name"])
    anns = [a for a in coco["annotations"] if a["image_id"] in ids]
    (out / "annotations.json").write_text(json.dumps({**coco, "images": images, "annotations": anns}))
    return out


def _people(file_name: str) -> list[np.ndarray]:
    from pycocotools import mask as mask_utils

    coco = json.loads((DATA / "annotations.json").read_text())
    info = next(i for i in coco["images"] if i["file_name"] == file_name)
    return [mask_utils.decode(a["segmentation"]).astype(bool) for a in coco["annotations"]
            if a["image_id"] == info["id"]]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    from appliance.models.detection.train import train

    data = _subset(TRAIN, tmp_path_factory.mktemp("person-data"))
    store = tmp_path_factory.mktemp("embeddings")
    out = tmp_path_factory.mktemp("sam-prompt-model")
    threads = torch.get_num_threads()
    try:  # both cores for the run (SAM decodes most of it), then the rest of the suite's setting back
        train(data, ["person"], out, arch="sam-prompt", epochs=20, batch_size=2, device="cpu", embedding_store=store,
              threads=2)
    finally:
        torch.set_num_threads(threads)
    return out, store


def test_only_the_trained_heads_are_saved(trained):
    out, _ = trained
    weights = torch.load(out / "weights.pth", weights_only=True)["state_dict"]
    assert not any(k.startswith(("backbone.", "sam_decoder.")) for k in weights)  # SAM loads from its checkpoint
    assert {k.split(".")[0] for k in weights} == {"heat", "scorer"}


def test_finds_people_on_photos_it_never_saw(trained):
    from appliance.models.detection.model import Detector

    out, store = trained
    detector = Detector(out, device="cpu", score_threshold=0.5, embedding_store=store)
    found = objects = false = 0
    for name in UNSEEN:
        pixels = np.asarray(Image.open(DATA / "images" / name).convert("RGB"))
        detections = detector.predict(pixels, key=content_key((DATA / "images" / name).read_bytes()))
        people = _people(name)
        for det in detections:
            assert det.label == "person" and det.mask.shape == pixels.shape[:2]
            x0, y0, x1, y1 = det.bbox
            assert 0 <= x0 < x1 <= pixels.shape[1] and 0 <= y0 < y1 <= pixels.shape[0]
        best = [max((iou(det.mask, person) for det in detections), default=0.0) for person in people]
        found += sum(b >= 0.5 for b in best)
        false += sum(max((iou(det.mask, p) for p in people), default=0.0) < 0.5 for det in detections)
        objects += len(people)
    assert found >= objects // 2, f"found {found} of {objects} people"
    assert false <= found, f"{false} detections on no person, {found} people found"
