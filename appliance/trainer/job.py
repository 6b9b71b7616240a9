"""One training job, run by the trainer in a subprocess (threads bounded, GPU memory released when it exits).

    python -m appliance.trainer.job --train D --holdout H --out O --classes a,b [--init W] [--current C] ...

Prints JSON lines on stdout: {"event": "iter", epoch, iter, loss, eta_s, ...} during training, then
{"event": "metrics", "candidate": {...}, "current": {...} | null}. Exit code non-zero on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path


def emit(event: dict) -> None:
    print(json.dumps(event), flush=True)


def holdout_scores(args) -> tuple[dict | None, dict | None]:
    """(candidate, current): each model's AP and annotator cost on the held-out tasks (models/detection/holdout).
    The candidate's score thresholds are chosen there; the current model is scored at the thresholds it serves."""
    from appliance.models.detection import holdout
    from appliance.models.detection.model import Detector
    from appliance.models.sam.engine import SamEngine
    from appliance.models.sam.store import EmbeddingStore

    from appliance.shared.embeddings import from_environment  # the machines' shared tier, when set

    # The store sam-det's pipeline uses (with the shared tier): an embedding encoded here is every machine's.
    store = EmbeddingStore(args.embeddings, args.embeddings_mb * 1024 * 1024, args.sam_model_type,
                           remote=from_environment()) if args.embeddings and args.embeddings_mb > 0 else None
    if not holdout.has_photos(args.holdout):
        return None, None
    engine = SamEngine(args.sam_checkpoint, args.sam_model_type, args.device)
    if engine.device.type == "cpu":
        with contextlib.suppress(Exception):  # the install's ONNX export when there is one; PyTorch gives the same
            engine.use_onnx(None, args.threads)
    held = holdout.load(args.holdout, holdout.sam_clicks(engine, store))
    del engine  # the clicks are computed: only the detectors' SAM parts are needed from here

    def detector(path: Path) -> Detector:
        return Detector(path, device=args.device, score_threshold=holdout.EVAL_THRESHOLD,
                        embedding_store=args.embeddings, embedding_store_mb=args.embeddings_mb)

    candidate = holdout.score(detector(args.out), held)
    if not args.current:
        return candidate, None
    labels = json.loads(args.current_labels) if args.current_labels is not None else None
    thresholds = json.loads(args.current_thresholds) if args.current_thresholds else {}
    label_of = (lambda name: labels.get(name)) if labels is not None else None
    current = holdout.score(detector(args.current), held, label_of,
                            thresholds, args.score_threshold)
    return candidate, current


# Defaults by device: a CPU trains small batches of small images; a GPU takes RTMDet's own size and bigger batches.
CPU_SIZES = {"img_size": 320, "batch_size": 4}
GPU_SIZES = {"img_size": 640, "batch_size": 16}


def device_defaults(device: str, img_size: int, batch_size: int) -> tuple[int, int]:
    """(img_size, batch_size) with 0 replaced by the default of the device the run uses."""
    import torch

    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    sizes = GPU_SIZES if on_gpu else CPU_SIZES
    return img_size or sizes["img_size"], batch_size or sizes["batch_size"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--holdout", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--classes", required=True)
    parser.add_argument("--init", type=Path)
    parser.add_argument("--init-classes", help="classes of --init when they are not --classes")
    parser.add_argument("--class-map", help='JSON {"label": "class of --init it continues"}')
    parser.add_argument("--init-trusted", action="store_true", help="--init is a full checkpoint the admin gave")
    parser.add_argument("--current", type=Path)
    parser.add_argument("--current-labels", help='JSON {"class of --current": "label" | null}')
    parser.add_argument("--current-thresholds", help='JSON {"class of --current": score threshold it serves}')
    parser.add_argument("--score-threshold", type=float, default=0.3, help="--current's for classes not listed")
    parser.add_argument("--arch", default="rtmdet-ins-tiny")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=0, help="0: the device's default")
    parser.add_argument("--img-size", type=int, default=0, help="0: the device's default")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--embeddings", type=Path, help="the shared SAM embedding store")
    parser.add_argument("--embeddings-mb", type=int, default=2048)
    parser.add_argument("--sam-model-type", default="vit_t")
    parser.add_argument("--sam-checkpoint", type=Path)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    args.img_size, args.batch_size = device_defaults(args.device, args.img_size, args.batch_size)
    from appliance.models.detection.train import train

    train(args.train, args.classes.split(","), args.out, arch=args.arch, init_weights=args.init,
          epochs=args.epochs, batch_size=args.batch_size, threads=args.threads, img_size=args.img_size,
          device=args.device, progress=emit, embedding_store=args.embeddings, embedding_store_mb=args.embeddings_mb,
          sam_model_type=args.sam_model_type, sam_checkpoint=args.sam_checkpoint,
          init_classes=args.init_classes.split(",") if args.init_classes else None,
          class_map=json.loads(args.class_map) if args.class_map else None, init_trusted=args.init_trusted)
    candidate, current = holdout_scores(args)
    emit({"event": "metrics", "candidate": candidate, "current": current})


if __name__ == "__main__":
    try:
        main()
    except Exception as error:  # one line for the trainer's status; the traceback goes to the log
        import traceback

        traceback.print_exc(file=sys.stderr)
        emit({"event": "error", "error": f"{type(error).__name__}: {error}"})
        raise SystemExit(1) from None
