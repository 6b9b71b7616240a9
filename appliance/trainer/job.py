"""One training job, run by the trainer in a subprocess (threads bounded, GPU memory released when it exits).

    python -m appliance.trainer.job JOB.json      (a spec.TrainingJob, written by the trainer)

Prints JSON lines on stdout: {"event": "iter", epoch, iter, loss, eta_s, ...} during training, then
{"event": "metrics", "candidate": {...}, "current": {...} | null}. Exit code non-zero on failure.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from appliance.models.device import resolve_device
from appliance.trainer.spec import TrainingJob


def emit(event: dict) -> None:
    print(json.dumps(event), flush=True)


def holdout_scores(args: TrainingJob) -> tuple[dict | None, dict | None]:
    """(candidate, current): each model's AP and annotator cost on the held-out tasks (models/detection/holdout).
    The candidate's score thresholds are chosen there; the current model is scored at the thresholds it serves."""
    from appliance.models.detection import holdout
    from appliance.models.detection.model import Detector
    from appliance.models.sam.engine import SamEngine
    from appliance.models.sam.store import EmbeddingStore, remote_tier

    # The store sam-det's pipeline uses (with the shared tier): an embedding encoded here is every machine's.
    store = EmbeddingStore(args.embeddings, args.embeddings_mb * 1024 * 1024, args.sam_model_type,
                           remote=remote_tier()) if args.embeddings and args.embeddings_mb > 0 else None
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
    labels = args.current_labels
    label_of = (lambda name: labels.get(name)) if labels is not None else None
    current = holdout.score(detector(args.current), held, label_of, dict(args.current_thresholds),
                            args.score_threshold)
    return candidate, current


# Defaults by device: a CPU trains small batches of small images; a GPU takes RTMDet's own size and bigger batches.
CPU_SIZES = {"img_size": 320, "batch_size": 4}
GPU_SIZES = {"img_size": 640, "batch_size": 16}


def device_defaults(device: str, img_size: int, batch_size: int) -> tuple[int, int]:
    """(img_size, batch_size) with 0 replaced by the default of the device the run uses."""
    on_gpu = resolve_device(device) == "cuda"
    sizes = GPU_SIZES if on_gpu else CPU_SIZES
    return img_size or sizes["img_size"], batch_size or sizes["batch_size"]


def main(argv: list[str] | None = None) -> None:
    args = TrainingJob.read(Path((argv if argv is not None else sys.argv[1:])[0]))

    import torch

    from appliance.models.sam.store import use_remote_tier
    from appliance.shared.embeddings import from_environment

    use_remote_tier(from_environment)  # the machines' shared embeddings, when set

    torch.set_num_threads(args.threads)
    img_size, batch_size = device_defaults(args.device, args.img_size, args.batch_size)
    from appliance.models.detection.train import train

    train(args.train, args.classes, args.out, arch=args.arch, init_weights=args.init,
          epochs=args.epochs, batch_size=batch_size, threads=args.threads, img_size=img_size,
          device=args.device, progress=emit, embedding_store=args.embeddings, embedding_store_mb=args.embeddings_mb,
          sam_model_type=args.sam_model_type, sam_checkpoint=args.sam_checkpoint,
          init_classes=args.init_classes, class_map=args.class_map, init_trusted=args.init_trusted)
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
