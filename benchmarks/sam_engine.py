"""Latency of the interactive SAM engine: the image encoder alone, and one decoder call per click.

    python benchmarks/sam_engine.py --threads 2 --clicks 20 --encodes 3 --encoders torch,onnxruntime,openvino

``--encoders torch,onnxruntime,openvino`` runs the same photos with PyTorch's image encoder and with its ONNX export
on each CPU engine (``SamEngine.use_onnx``, exported into a temporary folder first), so the rows compare on one
machine in one run.

Functions are importable so a larger benchmark can reuse them (``measure_encoder``, ``measure_decoder``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import skimage.data
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from appliance.models.sam.engine import SamEngine  # noqa: E402

PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": skimage.data.astronaut, "coffee": skimage.data.coffee, "chelsea": skimage.data.chelsea}


def timed_ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000.0


def measure_encoder(engine: SamEngine, image: np.ndarray, n: int, warmup: int = 1) -> list[float]:
    """Milliseconds of ``n`` calls to ``engine.embed`` (after ``warmup`` untimed ones)."""
    for _ in range(warmup):
        engine.embed(image)
    return [timed_ms(lambda: engine.embed(image)) for _ in range(n)]


def measure_decoder(engine: SamEngine, image: np.ndarray, n: int, warmup: int = 1, seed: int = 0) -> list[float]:
    """Milliseconds of ``n`` single-click ``engine.segment`` calls at random points on one cached embedding."""
    embedding = engine.embed(image)
    height, width = image.shape[:2]
    rng = np.random.default_rng(seed)
    clicks = [(float(rng.uniform(0, width)), float(rng.uniform(0, height))) for _ in range(n + warmup)]
    for point in clicks[:warmup]:
        engine.segment(embedding, [point], [1])
    return [timed_ms(lambda p=point: engine.segment(embedding, [p], [1])) for point in clicks[warmup:]]


def p50_p95(samples: list[float]) -> tuple[float, float]:
    return float(np.percentile(samples, 50)), float(np.percentile(samples, 95))


def format_table(rows: list[tuple[str, str, str, str, int, float, float]]) -> str:
    header = "| image | size | encoder | stage | n | p50 ms | p95 ms |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    lines += [f"| {img} | {size} | {encoder} | {stage} | {n} | {p50:.1f} | {p95:.1f} |"
              for img, size, encoder, stage, n, p50, p95 in rows]
    return "\n".join(lines)


def run(engine: SamEngine, photos: list[str], clicks: int, encodes: int) -> list[tuple]:
    rows = []
    for name in photos:
        image = PHOTOS[name]()
        size = f"{image.shape[1]}x{image.shape[0]}"
        encoder = engine.encoder_name
        rows.append((name, size, encoder, "encoder", encodes, *p50_p95(measure_encoder(engine, image, encodes))))
        rows.append((name, size, encoder, "decoder", clicks, *p50_p95(measure_decoder(engine, image, clicks))))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--clicks", type=int, default=20, help="decoder calls per photo")
    parser.add_argument("--encodes", type=int, default=3, help="encoder calls per photo")
    parser.add_argument("--photos", default="astronaut,coffee,chelsea", help=f"comma-separated: {', '.join(PHOTOS)}")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the bundled MobileSAM")
    parser.add_argument("--model-type", default="vit_t")
    parser.add_argument("--encoders", default="torch", help="comma-separated: torch, onnxruntime, openvino (CPU only)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = SamEngine(args.checkpoint, args.model_type, args.device)
    print(f"SAM {args.model_type} on {engine.device}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for encoder in args.encoders.split(","):
            if encoder != "torch":
                engine.use_onnx(Path(cache), args.threads, encoder)
            rows += run(engine, args.photos.split(","), args.clicks, args.encodes)
    print(format_table(rows))


if __name__ == "__main__":
    main()
