"""The SAM image encoder exported to ONNX, on OpenVINO and on ONNX Runtime, against PyTorch's: real MobileSAM weights,
real images.

Masks must stay the model's (IoU >= 0.99 per object against the PyTorch encoder's), and the features the same to
float error, so the embedding store serves every engine.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from appliance.models.sam import onnx_encoder, prompt_decoder
from appliance.models.sam.engine import SamEngine
from appliance.models.sam.onnx_encoder import cache_path

torch.set_num_threads(1)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
IMAGES_PER_SET = 2
OBJECTS_PER_IMAGE = 6


def interior_point(mask: np.ndarray) -> tuple[float, float]:
    """The object's most interior pixel (the simulated annotator's first click)."""
    distance = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return float(x), float(y)


def real_objects(name: str) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """The first images of a shared set with their largest objects' masks."""
    folder = DATA / name
    assert (folder / "annotations.json").is_file(), f"{folder} missing: the real-image sets live in ../shared/data"
    coco = COCO(str(folder / "annotations.json"))
    out = []
    for image_id in sorted(coco.getImgIds())[:IMAGES_PER_SET]:
        info = coco.loadImgs(image_id)[0]
        rgb = np.asarray(Image.open(folder / "images" / info["file_name"]).convert("RGB"))
        anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False)), key=lambda a: -a["area"])
        masks = [coco.annToMask(a).astype(bool) for a in anns[:OBJECTS_PER_IMAGE]]
        out.append((rgb, masks))
    return out


@pytest.fixture(scope="module")
def torch_engine() -> SamEngine:
    return SamEngine(device="cpu")


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module", autouse=True)
def no_installed_export(tmp_path_factory):
    """These tests export themselves: the install's own export (tested last) is hidden from them."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onnx_encoder, "INSTALLED_DIR", tmp_path_factory.mktemp("not-installed"))
        yield


@pytest.fixture(scope="module")
def onnx_engine(onnx_dir: Path) -> SamEngine:
    """The default: OpenVINO (installed by the lock), reading the export this fixture makes."""
    engine = SamEngine(device="cpu")
    engine.use_onnx(onnx_dir)
    assert engine.encoder_name == "openvino"
    return engine


@pytest.fixture(scope="module")
def ort_engine(onnx_engine, onnx_dir: Path) -> SamEngine:
    engine = SamEngine(device="cpu")
    engine.use_onnx(onnx_dir, runtime="onnxruntime")
    assert engine.encoder_name == "onnxruntime"
    return engine


@pytest.fixture(params=["openvino", "onnxruntime"])
def cpu_engine(request, onnx_engine, ort_engine) -> SamEngine:
    return onnx_engine if request.param == "openvino" else ort_engine


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


@pytest.mark.parametrize("dataset", ["nuclei", "coco-ccby"])
def test_cpu_engine_masks_equal_pytorch_masks_on_real_images(torch_engine, cpu_engine, dataset):
    ious = []
    for rgb, masks in real_objects(dataset):
        reference, candidate = torch_engine.embed(rgb), cpu_engine.embed(rgb)
        assert candidate.input_size == reference.input_size and candidate.original_size == reference.original_size
        diff = float((candidate.features - reference.features).abs().max())
        assert diff < 1e-3, f"{cpu_engine.encoder_name} features differ from PyTorch's by {diff}"
        for truth in masks:
            point = interior_point(truth)
            mask_t, _ = torch_engine.segment(reference, [point], [1])
            mask_o, _ = cpu_engine.segment(candidate, [point], [1])
            assert mask_t.sum() > 20, "an empty mask would compare equal whatever the encoder"
            ious.append(iou(mask_t, mask_o))
    assert len(ious) >= 2 * IMAGES_PER_SET
    assert min(ious) >= 0.99, f"per-object IoU {cpu_engine.encoder_name} vs PyTorch: {sorted(ious)[:5]}"


def test_stored_features_serve_either_engine(torch_engine, cpu_engine):
    rgb, masks = real_objects("coco-ccby")[0]
    stored = cpu_engine.embed(rgb).features[0].numpy()  # what the embedding store keeps
    point = interior_point(masks[0])
    from_store, _ = torch_engine.segment(torch_engine.from_features(stored, rgb.shape[:2]), [point], [1])
    fresh, _ = torch_engine.segment(torch_engine.embed(rgb), [point], [1])
    assert iou(from_store, fresh) >= 0.99


def test_export_is_cached_per_checkpoint_and_a_damaged_file_is_exported_again(onnx_engine, onnx_dir):
    path = cache_path(onnx_dir, onnx_engine.checkpoint, onnx_engine.model_type)
    assert path.is_file() and [p.name for p in onnx_dir.iterdir()] == [path.name], "one file, no leftover tmp"
    stamp = path.stat().st_mtime_ns
    again = SamEngine(device="cpu")
    again.use_onnx(onnx_dir)
    assert path.stat().st_mtime_ns == stamp, "a second start reuses the export"

    path.write_bytes(b"not an onnx model")
    damaged = SamEngine(device="cpu")
    with pytest.raises(Exception):  # noqa: B017 - whatever ONNX Runtime raises for a broken file
        damaged.use_onnx(onnx_dir)
    assert damaged.encoder_name == "torch" and not path.exists(), "the damaged file is dropped, PyTorch stays"
    damaged.use_onnx(onnx_dir)
    assert damaged.encoder_name == "openvino"


def test_auto_falls_back_to_onnx_runtime_when_openvino_cannot_load(onnx_engine, onnx_dir, monkeypatch):
    def unsupported(self, path, threads=1):  # what OpenVINO raises on a CPU its plugin does not support
        raise RuntimeError("Exception from src/inference/src/core.cpp: CPU plugin: unsupported instruction set")

    monkeypatch.setattr(onnx_encoder.OpenVinoEncoder, "__init__", unsupported)
    engine = SamEngine(device="cpu")
    engine.use_onnx(onnx_dir)
    assert engine.encoder_name == "onnxruntime", "auto keeps the CPU engine, not PyTorch"
    assert cache_path(onnx_dir, engine.checkpoint, engine.model_type).is_file(), "the export is not dropped"
    with pytest.raises(RuntimeError, match="CPU plugin"):  # asked for by name, OpenVINO's error is the answer
        SamEngine(device="cpu").use_onnx(onnx_dir, runtime="openvino")
    # ... and the sound export stays for the next start (ONNX Runtime reads it: the runtime failed, not the file).
    assert cache_path(onnx_dir, engine.checkpoint, engine.model_type).is_file()


def test_failed_export_keeps_the_pytorch_encoder(tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be")
    engine = SamEngine(device="cpu")
    with pytest.raises(OSError):
        engine.use_onnx(blocked)
    with pytest.raises(FileNotFoundError):  # installed export only (the training job): none here
        engine.use_onnx(None)
    assert engine.encoder_name == "torch"
    rgb = np.zeros((64, 96, 3), dtype=np.uint8)
    rgb[16:48, 24:72] = 255
    mask, _ = engine.segment(engine.embed(rgb), [(48.0, 32.0)], [1])
    assert mask[32, 48]


def test_the_install_exports_the_bundled_encoder(tmp_path, monkeypatch):
    # scripts/install.sh runs `appliance export-onnx`: the SAM backend then loads it and exports nothing.
    installed = Path(sys.prefix) / "share" / "appliance" / "onnx"
    monkeypatch.setattr(onnx_encoder, "INSTALLED_DIR", installed)
    engine = SamEngine(device="cpu")
    engine.use_onnx(tmp_path / "cache")
    assert engine.encoder_name == "openvino"
    assert engine._encoder.path.parent == installed, "the installed export is used"
    assert not (tmp_path / "cache").exists(), "nothing exported on the data volume"


def box_of(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


@pytest.mark.parametrize("dataset", ["nuclei", "coco-ccby"])
@pytest.mark.parametrize("prompt", ["point", "box"])
def test_prompt_decoder_on_onnx_runtime_gives_sams_own_masks(torch_engine, tmp_path, dataset, prompt):
    # sam-prompt decodes tens of points per image and sam-det one box per detection (training and serving) through
    # prompt_decoder: its export on ONNX Runtime must give SAM's own mask decoder's masks.
    sam = torch_engine.model
    exported = prompt_decoder.OnnxPromptDecoder(prompt_decoder.export(sam, tmp_path / "prompts.onnx"), threads=2)
    pe, no_mask = sam.prompt_encoder.get_dense_pe(), sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
    ious = []
    for rgb, masks in real_objects(dataset):
        embedding = torch_engine.embed(rgb)
        scale = embedding.input_size[0] / embedding.original_size[0]
        if prompt == "point":
            points = torch.tensor([interior_point(m) for m in masks]) * scale
            sparse = prompt_decoder.point_prompts(sam.prompt_encoder, points)
        else:
            sparse = prompt_decoder.box_prompts(sam.prompt_encoder, torch.tensor([box_of(m) for m in masks]) * scale)
        with torch.no_grad():
            reference, reference_iou = sam.mask_decoder.predict_masks(
                image_embeddings=embedding.features, image_pe=pe, sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=no_mask.expand(len(masks), -1, *pe.shape[-2:]))
        logits, predicted_iou = exported(embedding.features, sparse.detach())
        assert logits.shape == reference.shape == (len(masks), 4, 256, 256)
        assert float((predicted_iou - reference_iou).abs().max()) < 1e-3
        for mine, theirs in zip(logits.flatten(0, 1) > 0, reference.flatten(0, 1) > 0):
            if theirs.sum() > 20:
                ious.append(iou(mine.numpy(), theirs.numpy()))
    assert len(ious) >= 3 * IMAGES_PER_SET, "too few non-empty masks to compare"
    assert min(ious) >= 0.99, f"per-mask IoU ONNX Runtime vs SAM's decoder: {sorted(ious)[:5]}"


def test_the_install_exports_the_prompt_decoder_and_sam_det_uses_it(monkeypatch):
    from appliance.models.detection.samdet import sam_parts

    installed = Path(sys.prefix) / "share" / "appliance" / "onnx"
    monkeypatch.setattr(onnx_encoder, "INSTALLED_DIR", installed)
    sam_parts._load.cache_clear()
    try:
        sam = sam_parts.load_sam()
        decoder = sam_parts._prompt_decoders.get(sam.mask_decoder)
        assert isinstance(decoder, prompt_decoder.OnnxPromptDecoder) and decoder.path.parent == installed
        rgb = np.zeros((48, 64, 3), np.uint8)
        rgb[12:36, 16:48] = 255
        features = torch.as_tensor(sam_parts.encode(sam, rgb))[None]
        logits, scores = sam_parts.point_masks(sam.prompt_encoder, sam.mask_decoder, features,
                                               torch.tensor([[512.0, 384.0]] * 9))
        assert logits.shape == (27, 256, 256) and scores.shape == (27,), "9 points in two chunks, 3 masks each"
        masks = sam_parts.box_masks(sam.prompt_encoder, sam.mask_decoder, features,
                                    torch.tensor([[256.0, 192.0, 768.0, 576.0]] * 9), (768, 1024), (48, 64))
        assert masks.shape == (9, 48, 64) and masks[:, 24, 32].all() and not masks[:, 2, 2].any()
    finally:
        sam_parts._load.cache_clear()
