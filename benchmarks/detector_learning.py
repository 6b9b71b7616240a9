"""Does the detector learn? Train RTMDet-Ins-tiny from scratch on generated shapes and evaluate on held-out images.

Prints a table: training time, seconds per iteration, bbox and segm mAP (pycocotools) on the held-out set.
    .venv/app/bin/python benchmarks/detector_learning.py [--epochs 30] [--images 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from synthetic import make_dataset  # noqa: E402

from appliance.models.detection.evaluate import evaluate  # noqa: E402
from appliance.models.detection.model import Detector  # noqa: E402
from appliance.models.detection.train import train  # noqa: E402

CLASSES = ["circle", "square"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    iters = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_dataset(root / "train", args.images, CLASSES, seed=1)
        make_dataset(root / "val", 10, CLASSES, seed=2)
        began = time.monotonic()
        train(root / "train", CLASSES, root / "model", epochs=args.epochs, batch_size=4, img_size=320,
              threads=args.threads, progress=lambda e: iters.append(e) if e.get("event") == "iter" else None)
        seconds = time.monotonic() - began
        metrics = evaluate(Detector(root / "model", device="cpu"), root / "val" / "annotations.json",
                           root / "val" / "images")
    n_iter = iters[-1]["iter"] if iters else 0
    print("| epochs | iterations | train s | s/iter | bbox mAP | segm mAP |\n| --- | --- | --- | --- | --- | --- |")
    print(f"| {args.epochs} | {n_iter} | {seconds:.0f} | {seconds / max(n_iter, 1):.2f} | "
          f"{metrics['bbox_mAP']:.3f} | {metrics['segm_mAP']:.3f} |")


if __name__ == "__main__":
    main()
