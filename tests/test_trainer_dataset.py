"""The trainer's dataset builder: Label Studio annotations in, a COCO set that the detection trainer reads out.

Annotations are built in Label Studio's own formats (brush RLE from label_studio_sdk's encoder, percent
coordinates); images come through a fake `fetch`, the builder's seam for ImageFetcher.fetch.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.converter.brush import mask2rle
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from appliance.labelstudio.images import ImageError
from appliance.labelstudio.regions import annotation_objects, choose_annotation
from appliance.trainer.dataset import build_dataset, dataset_fingerprint, split_of

LABELS = ["Person", "Animal", "Vehicle"]
W, H = 80, 60


# --- Label Studio-format builders -----------------------------------------------------------------
def brush(mask: np.ndarray, label: str, original: tuple[int, int] | None = None) -> dict:
    height, width = original[::-1] if original else mask.shape
    return {"id": f"b{label}", "type": "brushlabels", "from_name": "mask", "to_name": "image",
            "original_width": width, "original_height": height, "image_rotation": 0,
            "value": {"format": "rle", "rle": mask2rle(np.where(mask, 255, 0).astype(np.uint8)),
                      "brushlabels": [label]}}


def polygon(points_px: list[tuple[float, float]], label: str, size: tuple[int, int] = (W, H)) -> dict:
    width, height = size
    points = [[100.0 * x / width, 100.0 * y / height] for x, y in points_px]
    return {"type": "polygonlabels", "from_name": "poly", "to_name": "image",
            "value": {"points": points, "closed": True, "polygonlabels": [label]}}


def rectangle(x: float, y: float, w: float, h: float, label: str, rotation: float = 0) -> dict:
    """A rectangle from pixel coordinates on the W x H image, stored in percent as Label Studio does."""
    return {"type": "rectanglelabels", "from_name": "box", "to_name": "image", "original_width": W,
            "original_height": H, "value": {"x": 100 * x / W, "y": 100 * y / H, "width": 100 * w / W,
                                            "height": 100 * h / H, "rotation": rotation,
                                            "rectanglelabels": [label]}}


def keypoint(x: float, y: float, label: str) -> dict:
    return {"type": "keypointlabels", "from_name": "point", "to_name": "image",
            "value": {"x": 100 * x / W, "y": 100 * y / H, "width": 1, "keypointlabels": [label]}}


def annotation(result: list[dict], ann_id: int = 1, updated_at: str = "2025-01-01T10:00:00.000000Z",
               cancelled: bool = False, ground_truth: bool = False) -> dict:
    return {"id": ann_id, "result": result, "was_cancelled": cancelled, "ground_truth": ground_truth,
            "created_at": updated_at, "updated_at": updated_at}


def task(task_id: int, *annotations: dict) -> dict:
    return {"id": task_id, "data": {"image": f"/data/upload/1/{task_id}.png"}, "annotations": list(annotations)}


def png_bytes(width: int = W, height: int = H, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def disk_mask(cx: int, cy: int, r: int, size: tuple[int, int] = (W, H)) -> np.ndarray:
    ys, xs = np.mgrid[:size[1], :size[0]]
    return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r


class FakeStudio:
    """Serves task images by URL; URLs containing "missing" fail as ImageFetcher would."""

    def __init__(self, images: dict[str, bytes] | None = None) -> None:
        self.images = images or {}
        self.calls: list[tuple[str, int]] = []

    def fetch(self, url: str, task_id: int) -> bytes:
        self.calls.append((url, task_id))
        if "missing" in url:
            raise ImageError(f"image {url!r} not found (HTTP 404)")
        return self.images.get(url) or png_bytes(seed=task_id)


def build(tmp_path: Path, tasks: list[dict], studio: FakeStudio | None = None, split: str = "train",
          holdout_percent: int = 0, name: str = "ds"):
    studio = studio or FakeStudio()
    info = build_dataset(tasks, LABELS, tmp_path / name, studio.fetch, split, holdout_percent, tmp_path / "cache")
    return info, json.loads(info.annotations_path.read_text())


def objects_of(result: list[dict]) -> list[dict]:
    return annotation_objects(annotation(result), W, H, LABELS)


# --- regions -> objects ---------------------------------------------------------------------------
def test_brush_mask_round_trips_through_coco_rle(tmp_path):
    mask = disk_mask(30, 25, 12)
    mask[5:9, 60:75] = True  # a second, detached part of the same object
    info, coco = build(tmp_path, [task(1, annotation([brush(mask, "Animal")]))])
    assert (info.images, info.objects, info.per_label["Animal"]) == (1, 1, 1)
    [ann] = coco["annotations"]
    assert isinstance(ann["segmentation"]["counts"], str)
    decoded = mask_utils.decode({"size": ann["segmentation"]["size"],
                                 "counts": ann["segmentation"]["counts"].encode()})
    assert np.array_equal(decoded.astype(bool), mask)
    assert ann["area"] == int(mask.sum())
    assert ann["bbox"] == [18.0, 5.0, 57.0, 33.0]  # x from the disk's left to the bar's right end
    assert (ann["category_id"], ann["iscrowd"], ann["image_id"]) == (2, 0, 1)


def test_brush_in_another_frame_is_resized_to_the_image():
    mask = np.zeros((H * 2, W * 2), dtype=bool)
    mask[20:60, 40:100] = True
    [obj] = objects_of([brush(mask, "Person", original=(W * 2, H * 2))])
    assert obj["mask"].shape == (H, W)
    assert obj["bbox"] == [20.0, 10.0, 30.0, 20.0]


def test_polygon_is_rasterised():
    [obj] = objects_of([polygon([(10, 10), (50, 10), (50, 40), (10, 40)], "Vehicle")])
    assert obj["label"] == "Vehicle" and obj["mask"].dtype == bool and obj["mask"].shape == (H, W)
    assert abs(int(obj["mask"].sum()) - 40 * 30) <= 2 * (40 + 30) + 1  # fillPoly includes the boundary pixels
    [triangle] = objects_of([polygon([(0, 0), (40, 0), (0, 40)], "Vehicle")])
    assert abs(int(triangle["mask"].sum()) - 800) < 0.1 * 800


def test_rectangle_becomes_a_box_object():
    [obj] = objects_of([rectangle(8, 6, 20, 16, "Person")])
    assert obj["bbox"] == pytest.approx([8, 6, 20, 16])
    assert int(obj["mask"].sum()) == 20 * 16 and obj["mask"][6:22, 8:28].all()
    [rotated] = objects_of([rectangle(30, 10, 20, 10, "Person", rotation=90)])  # about its top-left corner
    assert rotated["bbox"] == pytest.approx([20, 10, 10, 20])


def test_prompt_rectangle_of_a_brush_object_is_dropped():
    mask = np.zeros((H, W), dtype=bool)
    mask[10:30, 10:40] = True
    prompt = rectangle(9, 9, 32, 22, "Animal")              # the SAM box prompt around the brush object
    other_label = rectangle(9, 9, 32, 22, "Vehicle")        # same place, other label: a real object
    elsewhere = rectangle(50, 35, 20, 20, "Animal")         # same label, no overlap: a real object
    objects = objects_of([prompt, brush(mask, "Animal"), other_label, elsewhere])
    assert [(o["label"], o["bbox"]) for o in objects] == [
        ("Animal", [10.0, 10.0, 30.0, 20.0]),
        ("Vehicle", pytest.approx([9, 9, 32, 22])),
        ("Animal", pytest.approx([50, 35, 20, 20])),
    ]


def test_one_objects_brush_and_polygon_from_sam_are_one_training_object():
    from appliance.models.sam.masks import mask_to_polygons

    mask = disk_mask(30, 30, 14)
    outline = {"type": "polygonlabels", "from_name": "outline", "to_name": "image",
               "value": {"points": mask_to_polygons(mask)[0], "polygonlabels": ["Animal"]}}
    other = polygon([(60, 10), (75, 10), (75, 25)], "Animal")  # a second object drawn as a polygon only
    cat = dict(outline, value={**outline["value"], "polygonlabels": ["Vehicle"]})  # same outline, other label
    objects = objects_of([brush(mask, "Animal"), outline, other, cat])
    assert [o["label"] for o in objects] == ["Animal", "Animal", "Vehicle"]
    assert np.array_equal(objects[0]["mask"], mask)  # the brush (pixel-exact) is the one kept


def test_unknown_labels_keypoints_and_empty_regions_are_ignored():
    mask = disk_mask(20, 20, 8)
    objects = objects_of([
        brush(mask, "Spaceship"),
        keypoint(20, 20, "Animal"),
        rectangle(5, 5, 10, 10, "Tree"),
        brush(np.zeros((H, W), dtype=bool), "Animal"),
        {"type": "choices", "value": {"choices": ["Animal"]}},
        brush(mask, "Person"),
    ])
    assert [o["label"] for o in objects] == ["Person"]


# --- annotation choice ----------------------------------------------------------------------------
def test_latest_non_cancelled_annotation_is_used_and_ground_truth_wins():
    old = annotation([rectangle(1, 1, 10, 10, "Person")], 1, "2025-01-01T10:00:00Z")
    new = annotation([rectangle(1, 1, 10, 10, "Animal")], 2, "2025-01-02T10:00:00.5Z")
    newest_cancelled = annotation([rectangle(1, 1, 10, 10, "Vehicle")], 3, "2025-01-03T10:00:00Z", cancelled=True)
    assert choose_annotation(task(1, old, new, newest_cancelled))["id"] == 2
    old["ground_truth"] = True
    assert choose_annotation(task(1, old, new, newest_cancelled))["id"] == 1
    assert choose_annotation(task(1, newest_cancelled)) is None


def test_build_uses_chosen_annotation_and_skips_what_it_cannot_use(tmp_path):
    tasks = [
        task(1, annotation([rectangle(1, 1, 10, 10, "Person")], 1, "2025-01-01T10:00:00Z"),
             annotation([rectangle(1, 1, 10, 10, "Animal")], 2, "2025-01-02T10:00:00Z"),
             annotation([rectangle(1, 1, 10, 10, "Vehicle")], 3, "2025-01-03T10:00:00Z", cancelled=True)),
        task(2, annotation([rectangle(1, 1, 10, 10, "Person")], cancelled=True)),
        {**task(3, annotation([rectangle(1, 1, 10, 10, "Person")])), "data": {"image": "/data/missing.png"}},
        {**task(4, annotation([])), "data": {"image": "/data/upload/1/corrupt.png"}},
        task(5, annotation([])),  # a negative: submitted with no regions
        {**task(6, annotation([])), "data": {}},
    ]
    studio = FakeStudio({"/data/upload/1/corrupt.png": b"\x89PNG\r\n\x1a\n not really"})
    info, coco = build(tmp_path, tasks, studio)
    assert [image["id"] for image in coco["images"]] == [1, 5]
    assert [a["category_id"] for a in coco["annotations"]] == [2]
    assert (info.images, info.objects, info.negatives) == (2, 1, 1)
    assert info.per_label == {"Person": 0, "Animal": 1, "Vehicle": 0}
    reasons = dict(info.skipped)
    assert sorted(reasons) == [2, 3, 4, 6]
    assert "cancelled" in reasons[2] and "404" in reasons[3] and "ImageError" in reasons[4]
    assert "image" in reasons[6]


def test_images_are_cached_by_url_and_written_with_exif_applied(tmp_path):
    pixels = np.zeros((H, W, 3), dtype=np.uint8)
    pixels[:10, :, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", exif=exif)
    photo = {**task(7, annotation([])), "data": {"image": "/data/upload/1/photo.jpg"}}
    studio = FakeStudio({"/data/upload/1/photo.jpg": buffer.getvalue()})
    tasks = [task(1, annotation([])), photo]
    info, coco = build(tmp_path, tasks, studio)
    build(tmp_path, tasks, studio, name="again")
    assert len(studio.calls) == 2, "the second build reads the image cache"
    by_id = {image["id"]: image for image in coco["images"]}
    assert (by_id[7]["file_name"], by_id[7]["width"], by_id[7]["height"]) == ("7.jpg", H, W)
    assert by_id[1]["file_name"] == "1.png"
    with Image.open(tmp_path / "ds" / "images" / "7.jpg") as written:
        assert written.size == (H, W) and written.getexif().get(0x0112) is None


# --- split and fingerprint ------------------------------------------------------------------------
def test_split_is_deterministic_and_proportional():
    splits = [split_of(i, 20) for i in range(1, 1001)]
    assert splits == [split_of(i, 20) for i in range(1, 1001)]
    assert 150 <= splits.count("holdout") <= 250
    assert all(split_of(i, 0) == "train" and split_of(i, 100) == "holdout" for i in range(1, 50))
    # Growing the holdout share only moves tasks into holdout, never out of it.
    assert all(split_of(i, 30) == "holdout" for i in range(1, 1001) if splits[i - 1] == "holdout")
    assert [split_of(i, 20, seed="other") for i in range(1, 1001)] != splits
    with pytest.raises(ValueError):
        split_of(1, 101)


def test_build_takes_only_its_split(tmp_path):
    tasks = [task(i, annotation([rectangle(1, 1, 10, 10, "Person")])) for i in range(1, 41)]
    train_info, train = build(tmp_path, tasks, split="train", holdout_percent=25, name="train")
    hold_info, hold = build(tmp_path, tasks, split="holdout", holdout_percent=25, name="holdout")
    train_ids = {image["id"] for image in train["images"]}
    hold_ids = {image["id"] for image in hold["images"]}
    assert train_ids.isdisjoint(hold_ids) and train_ids | hold_ids == set(range(1, 41))
    assert hold_ids == {i for i in range(1, 41) if split_of(i, 25) == "holdout"}
    assert not train_info.skipped and not hold_info.skipped


def test_fingerprint_changes_when_an_annotation_changes():
    tasks = [task(1, annotation([], 1, "2025-01-01T10:00:00Z")), task(2, annotation([], 2))]
    before = dataset_fingerprint(tasks)
    assert dataset_fingerprint(list(reversed(tasks))) == before
    tasks[0]["annotations"][0]["updated_at"] = "2025-01-05T10:00:00Z"
    updated = dataset_fingerprint(tasks)
    assert updated != before
    tasks[1]["annotations"].append(annotation([], 3, "2025-02-01T10:00:00Z"))
    assert dataset_fingerprint(tasks) not in (before, updated)


# --- the consumers --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed_dataset(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    """Two annotated images (brush, polygon, rectangle) and one negative."""
    tmp_path = tmp_path_factory.mktemp("mixed")
    disk = disk_mask(30, 30, 14)
    tasks = [
        task(1, annotation([brush(disk, "Person"), rectangle(14, 14, 34, 34, "Person"),
                            polygon([(50, 5), (75, 5), (75, 25)], "Vehicle")])),
        task(2, annotation([rectangle(10, 20, 30, 25, "Animal")])),
        task(3, annotation([])),
    ]
    info, _ = build(tmp_path, tasks)
    assert (info.images, info.objects, info.negatives) == (3, 3, 1)
    return info.annotations_path.parent, [disk]


def test_output_loads_with_pycocotools(mixed_dataset):
    directory, [disk] = mixed_dataset
    coco = COCO(str(directory / "annotations.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == LABELS
    for image in coco.loadImgs(coco.getImgIds()):
        assert (directory / "images" / image["file_name"]).is_file()
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image["id"])):
            assert coco.annToMask(ann).shape == (image["height"], image["width"])
    [person] = coco.loadAnns(coco.getAnnIds(catIds=[1]))
    assert np.array_equal(coco.annToMask(person).astype(bool), disk)


def test_output_loads_with_mmdet_as_the_trainer_configures_it(mixed_dataset, tmp_path):
    directory, [disk] = mixed_dataset
    pytest.importorskip("mmdet")
    from appliance import compat

    compat.install()
    import mmdet.datasets  # noqa: F401  (registers CocoDataset and its transforms)
    from mmdet.registry import DATASETS
    from mmengine.registry import init_default_scope

    from appliance.models.detection.configs import build_config

    cfg = build_config("rtmdet-ins-tiny", LABELS, tmp_path / "work", directory)  # the mask-loading pipeline
    dataset_cfg = cfg.train_dataloader.dataset
    assert (dataset_cfg.ann_file, dataset_cfg.data_prefix["img"]) == ("annotations.json", "images/")
    # Only the configured loading steps: the augmentations are mmdet's business, the annotations are ours.
    dataset_cfg.pipeline = [step for step in cfg.train_pipeline if step["type"].startswith("Load")]
    init_default_scope("mmdet")
    dataset = DATASETS.build(dataset_cfg)
    assert len(dataset) == 2, "filter_empty_gt drops the negative image"
    samples = {dataset[i]["img_id"]: dataset[i] for i in range(len(dataset))}
    first = samples[1]
    masks = first["gt_masks"].masks
    assert masks.shape == (2, H, W) and first["img"].shape == (H, W, 3)
    assert np.array_equal(masks[0].astype(bool), disk)
    assert list(first["gt_bboxes_labels"]) == [0, 2]  # Person, Vehicle (the prompt box was dropped)
    assert samples[2]["gt_masks"].masks[0][20:45, 10:40].all()
