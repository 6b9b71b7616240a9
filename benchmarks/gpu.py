"""The models on the device they run on (a GPU when one is usable): SAM encoder, cached click, a training run and bulk
pre-annotation, on real images (../shared/data/nuclei), printed as a table with the device facts above it.

    .venv/app/bin/python benchmarks/gpu.py [--device auto|cuda|cpu] [--n 20] [--epochs 20] [--predict 45]

The training run is sam-det on nuclei 1..N with the trainer's own code (batch and image size: the device's
defaults, see appliance.trainer.job.device_defaults); its embeddings are computed first, as the SAM backend does while
annotators click (timed as "encode N images"). Bulk pre-annotation runs the trained model through the prediction
backend's Detector on the next images (their embeddings computed on the way, as for tasks nobody opened).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from learning_curve import DATA, load_nuclei, subset  # noqa: E402
from sam_engine import measure_decoder, measure_encoder  # noqa: E402


def pixels(info: dict) -> np.ndarray:
    return np.asarray(Image.open(DATA / "images" / info["file_name"]).convert("RGB"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--n", type=int, default=20, help="training images")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--predict", type=int, default=45, help="images pre-annotated in bulk")
    parser.add_argument("--clicks", type=int, default=20)
    args = parser.parse_args()

    import torch

    from appliance import gpu
    from appliance.models.detection.model import Detector
    from appliance.models.detection.train import train
    from appliance.models.sam.engine import SamEngine
    from appliance.trainer.job import device_defaults

    info = gpu.report()
    device = ("cuda" if info["usable"] else "cpu") if args.device == "auto" else args.device
    print(f"device: {gpu.summary(info)}; benchmark on {device}")
    coco, images = load_nuclei(DATA)
    rows = []

    engine = SamEngine(model_type="vit_t", device=device)
    photo = pixels(images[0])
    encode_ms = measure_encoder(engine, photo, 5)
    click_ms = measure_decoder(engine, photo, args.clicks)
    rows.append(("SAM encoder (MobileSAM, one image)", f"{statistics.median(encode_ms):.0f} ms"))
    rows.append(("click on a cached embedding", f"{statistics.median(click_ms):.1f} ms"))

    img_size, batch = device_defaults(device, 0, 0)
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        work = Path(tmp)
        store = work / "embeddings"
        subset(coco, images[:args.n], work / "train", "nucleus")
        from learning_curve import fill_store

        began = time.monotonic()
        if device == "cpu":
            fill_store(store, images[:args.n])
        else:  # fill_store encodes on the CPU; on a GPU the SAM backend encodes on the GPU
            from appliance.models.sam.cache import content_key
            from appliance.models.sam.store import EmbeddingStore

            kept = EmbeddingStore(store, 1 << 40)
            for item in images[:args.n]:
                data = (DATA / "images" / item["file_name"]).read_bytes()
                kept.put(content_key(data), engine.embed(pixels(item)).features.cpu().numpy()[0])
        rows.append((f"encode {args.n} images into the store", f"{time.monotonic() - began:.1f} s"))

        began = time.monotonic()
        train(work / "train", ["nucleus"], work / "model", arch="sam-det", epochs=args.epochs, batch_size=batch,
              img_size=img_size, device=device, embedding_store=store, threads=torch.get_num_threads())
        rows.append((f"training run (sam-det, {args.n} images, {args.epochs} epochs, batch {batch})",
                     f"{time.monotonic() - began:.1f} s"))

        detector = Detector(work / "model", device=device, score_threshold=0.3, embedding_store=store)
        todo = images[args.n:args.n + args.predict]
        began = time.monotonic()
        masks = sum(len(detector.predict(pixels(item))) for item in todo)
        seconds = time.monotonic() - began
        rows.append((f"bulk pre-annotation ({len(todo)} new images, {masks} masks)",
                     f"{seconds:.1f} s ({len(todo) / seconds:.2f} images/s)"))

    print("\n| step | time |\n| --- | --- |")
    for step, value in rows:
        print(f"| {step} | {value} |")


if __name__ == "__main__":
    main()
