"""sam-det with the real MobileSAM weights: the SAM encoder as an MMDetection backbone, box -> SAM mask, the shared
embedding store across processes, and a short train -> predict round trip with masks at the image's exact size."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from appliance.models.sam.cache import content_key
from appliance.models.sam.store import EmbeddingStore
from synthetic import make_dataset, make_image

torch = pytest.importorskip("torch")
pytest.importorskip("mmdet")

import appliance.models.detection.samdet  # noqa: E402,F401  (registers the modules)
from appliance.models.detection.samdet.sam_parts import box_masks, encode, input_size, load_sam  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def shape_image() -> tuple[np.ndarray, np.ndarray]:
    """A 203x151 photo with one filled shape, and the shape's mask."""
    image, objects = make_image(np.random.default_rng(5), 1, size=(203, 151))
    return np.asarray(image.convert("RGB")), objects[0][2]


def test_sam_encoder_is_an_mmdet_backbone(shape_image):
    from mmdet.registry import MODELS

    from appliance.models.detection.samdet.sam_parts import preprocess

    backbone = MODELS.build(dict(type="SamImageEncoder"))
    assert not any(p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not backbone.encoder.training  # frozen: stays in eval mode inside a training model
    image = preprocess(load_sam(), shape_image[0])[None]
    assert image.shape == (1, 3, 1024, 1024)
    with torch.no_grad():
        embedding = backbone(image)
    assert embedding.shape == (1, 256, 64, 64)
    # The same features the SAM backend computes; and an embedding passes through unchanged.
    assert np.allclose(embedding[0].numpy(), encode(load_sam(), shape_image[0]), atol=1e-4)
    assert backbone(embedding) is embedding
    neck = MODELS.build(dict(type="SamSimpleFPN", in_channels=256, out_channels=32, scales=(2.0, 1.0, 0.5)))
    assert [f.shape[-1] for f in neck(embedding)] == [128, 64, 32]


def test_box_prompt_gives_a_sam_mask_of_the_exact_image_size(shape_image):
    image, truth = shape_image
    sam = load_sam()
    features = torch.as_tensor(encode(sam, image))[None]
    ys, xs = np.nonzero(truth)
    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)
    height, width = truth.shape
    in_size = input_size(height, width)
    scale = in_size[1] / width
    masks = box_masks(sam.prompt_encoder, sam.mask_decoder, features, torch.as_tensor(box * scale)[None],
                      in_size, (height, width))
    assert masks.shape == (1, height, width) and masks.dtype == torch.bool
    mask = masks[0].numpy()
    iou = np.logical_and(mask, truth).sum() / np.logical_or(mask, truth).sum()
    assert iou > 0.7, iou


WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from appliance.models.sam.store import EmbeddingStore
    store = EmbeddingStore(sys.argv[1], int(sys.argv[2]))
    for i in range(int(sys.argv[3])):
        store.put(f"{i:040x}", np.full((256, 64, 64), i, dtype=np.float32))
    print("written", flush=True)
""")


def test_embedding_store_is_shared_across_processes_bounded_and_atomic(tmp_path):
    root, per_file = tmp_path / "embeddings", 256 * 64 * 64 * 4 + 128
    # Another process writes 6 embeddings into a store bounded to 4 of them, while this one reads.
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(4 * per_file), "6"], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    reader = EmbeddingStore(root, 4 * per_file)
    seen = 0
    while writer.poll() is None:
        for i in range(6):
            array = reader.get(f"{i:040x}")
            if array is not None:  # a file is whole or absent, never half written
                assert array.shape == (256, 64, 64) and (array == i).all()
                seen += 1
    assert writer.wait() == 0 and "written" in writer.stdout.read()
    stats = reader.stats()
    # Two were evicted (the least recently used: which ones depends on what this process read meanwhile), never
    # the one just written.
    assert stats["files"] == 4 and stats["bytes"] <= 4 * per_file
    assert (reader.get(f"{5:040x}") == 5).all()
    assert not list(root.glob(".*.tmp"))  # no temporary file left behind
    # A model type has its own keys: vit_b features never answer for vit_t.
    assert EmbeddingStore(root, 4 * per_file, "vit_b").get(f"{5:040x}") is None


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    from appliance.models.detection.train import train

    data = tmp_path_factory.mktemp("samdet-data")
    make_dataset(data, 3, ["circle", "rectangle"], seed=2)
    coco = json.loads((data / "annotations.json").read_text())
    for info in coco["images"]:  # as the trainer's dataset builder writes them
        info["content_key"] = content_key((data / "images" / info["file_name"]).read_bytes())
    (data / "annotations.json").write_text(json.dumps(coco))
    store = tmp_path_factory.mktemp("embeddings")
    out = tmp_path_factory.mktemp("samdet-model")
    events: list[dict] = []
    train(data, ["circle", "rectangle"], out, arch="sam-det", epochs=1, batch_size=2, progress=events.append,
          device="cpu", embedding_store=store)
    assert events[-1]["event"] == "done"
    return out, store, data


def test_samdet_trains_through_mmengine_and_stores_the_embeddings(trained):
    import torch as t

    out, store, data = trained
    assert {"config.py", "weights.pth", "classes.json"} <= {p.name for p in out.iterdir()}
    weights = t.load(out / "weights.pth", weights_only=True)["state_dict"]
    assert not any(k.startswith(("backbone.", "sam_decoder.")) for k in weights)  # frozen SAM parts left out
    assert any(k.startswith("bbox_head.") for k in weights) and any(k.startswith("neck.") for k in weights)
    assert len(list(store.glob("vit_t-*.npy"))) == 3  # one embedding per training image, computed once


def test_samdet_detector_masks_have_the_image_size(trained):
    from appliance.models.detection.model import Detector

    out, store, _ = trained
    detector = Detector(out, device="cpu", score_threshold=0.0, embedding_store=store)
    image = np.asarray(make_image(np.random.default_rng(8), 2, (203, 151))[0].convert("RGB"))
    key = "f" * 40
    detections = detector.predict(image, key=key)
    assert (store / f"vit_t-{key}.npy").exists()  # computed once, stored for the next process
    for det in detections:
        assert det.mask is not None and det.mask.shape == (151, 203) and det.label in ("circle", "rectangle")
        x0, y0, x1, y1 = det.bbox
        assert 0 <= x0 <= x1 <= 203 and 0 <= y0 <= y1 <= 151


def test_label_mapped_init_carries_the_head_rows_of_the_mapped_classes(trained, tmp_path):
    """A model of circle/rectangle starts a project labelled Box/Triangle, with the map Box <- rectangle: Box's
    class scores are rectangle's, boxes are regressed as before, and Triangle (no source class) starts fresh."""
    from mmdet.registry import MODELS

    from appliance.models.detection import transfer
    from appliance.models.detection.configs import build_config
    from appliance.models.detection.model import Detector

    out, store, data = trained
    source = Detector(out, device="cpu")._model.eval()
    cfg = build_config("sam-det", ["Box", "Triangle"], tmp_path / "work")
    init = transfer.mapped_init(cfg, out / "weights.pth", ["circle", "rectangle"], ["Box", "Triangle"],
                                {"Box": "rectangle"}, tmp_path / "init.pth")
    state = torch.load(init, weights_only=True)["state_dict"]
    target = MODELS.build(cfg.model).eval()
    missing, unexpected = target.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith(("backbone.", "sam_decoder.")) for k in missing)

    embedding = torch.from_numpy(np.load(next(store.glob("vit_t-*.npy"))))[None]
    with torch.no_grad():
        (src_cls, src_box), (new_cls, new_box) = (m.bbox_head(m.neck(embedding)) for m in (source, target))
    for level in range(len(src_cls)):
        assert torch.allclose(new_cls[level][:, 0], src_cls[level][:, 1])  # Box continues rectangle
        assert not torch.allclose(new_cls[level][:, 1], src_cls[level][:, 0])  # Triangle is new, not circle
        assert torch.allclose(new_box[level], src_box[level])


def test_label_mapped_fine_tune_runs_from_the_source_weights(trained, tmp_path):
    from appliance.models.detection.train import train

    out, store, data = trained
    coco = json.loads((data / "annotations.json").read_text())
    coco["categories"] = [{"id": 1, "name": "Round"}, {"id": 2, "name": "Box"}]
    renamed = tmp_path / "data"
    (renamed / "images").mkdir(parents=True)
    for info in coco["images"]:
        (renamed / "images" / info["file_name"]).write_bytes((data / "images" / info["file_name"]).read_bytes())
    (renamed / "annotations.json").write_text(json.dumps(coco))
    events: list[dict] = []
    model = train(renamed, ["Round", "Box"], tmp_path / "model", arch="sam-det", epochs=1, batch_size=2,
                  device="cpu", embedding_store=store, progress=events.append, lr=0.0,
                  init_weights=out / "weights.pth", init_classes=["circle", "rectangle"],
                  class_map={"Round": "circle", "Box": "rectangle"})
    assert json.loads((model / "classes.json").read_text()) == ["Round", "Box"]
    before = torch.load(out / "weights.pth", weights_only=True)["state_dict"]
    after = torch.load(model / "weights.pth", weights_only=True)["state_dict"]
    # With a learning rate of 0, the run ends where the mapped source started it (BatchNorm statistics move).
    head = [k for k in before if k.startswith("bbox_head.") and ".bn" not in k and "running" not in k
            and "num_batches" not in k]
    assert head and all(torch.equal(before[k], after[k]) for k in head)
