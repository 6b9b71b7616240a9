"""Train an instance-segmentation model with mmengine's Runner.

Writes out_dir/config.py, weights.pth (a plain state dict) and classes.json,
the layout ModelRegistry.publish() expects. Meant to run in a subprocess:

    python -m appliance.models.detection.train --dataset DIR --out DIR --classes a,b

prints one JSON object per line on stdout (progress, then {"event": "done"});
everything else (mmengine logs) goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from mmengine.hooks import Hook

from appliance import compat
from appliance.models.detection import transfer
from appliance.models.detection.configs import DEFAULT_ARCH, build_config
from appliance.models.device import resolve_device

Progress = Callable[[dict], None]


def train(
    dataset_dir: Path,
    classes: list[str],
    out_dir: Path,
    arch: str = DEFAULT_ARCH,
    init_weights: Path | None = None,
    epochs: int = 30,
    batch_size: int = 4,
    threads: int = 1,
    progress: Progress | None = None,
    lr: float | None = None,
    img_size: int | None = None,
    device: str = "auto",
    seed: int = 0,
    log_level: str = "WARNING",
    embedding_store: Path | None = None,
    embedding_store_mb: int = 2048,
    sam_model_type: str = "vit_t",
    sam_checkpoint: Path | None = None,
    init_classes: list[str] | None = None,
    class_map: dict[str, str] | None = None,
    init_trusted: bool = False,
) -> Path:
    """Train on dataset_dir (annotations.json + images/) and write the model to out_dir.

    init_weights start the run; when they were trained on other classes (``init_classes``), the head's class rows
    are carried over by name or through ``class_map`` (label -> the init model's class it continues), see
    transfer.py. ``init_trusted``: the init file is a full checkpoint the admin provided.

    The batch is min(batch_size, training images) and the learning rate (unless given) the architecture's recipe
    rate scaled linearly to that batch. Seeded and deterministic: the same data and seed give the same model.
    """
    compat.install()

    _set_threads(threads)
    dataset_dir, out_dir = Path(dataset_dir).resolve(), Path(out_dir)
    if not (dataset_dir / "annotations.json").is_file():
        raise FileNotFoundError(f"{dataset_dir / 'annotations.json'} not found")
    out_dir.mkdir(parents=True, exist_ok=True)
    images = len(json.loads((dataset_dir / "annotations.json").read_text()).get("images") or [])
    batch_size = max(1, min(batch_size, images))
    work_dir = Path(tempfile.mkdtemp(prefix="train-", dir=out_dir))
    try:
        cfg = build_config(arch, classes, work_dir, dataset_dir, epochs, batch_size, lr,
                           img_size, load_from=init_weights, embedding_store=embedding_store,
                           embedding_store_mb=embedding_store_mb, sam_model_type=sam_model_type,
                           sam_checkpoint=sam_checkpoint)
        if init_weights and init_classes is not None and list(init_classes) != list(classes):
            cfg.load_from = str(transfer.mapped_init(cfg, init_weights, list(init_classes), list(classes),
                                                     class_map or {}, work_dir / "init.pth", init_trusted))
        elif init_weights and init_trusted:
            cfg.load_from = str(_plain_copy(init_weights, work_dir / "init.pth"))
        compat.deterministic_env()
        cfg.randomness = dict(seed=seed, deterministic=True)
        cfg.log_level = log_level
        use_cpu = resolve_device(device) == "cpu"
        state_dict, frozen = _run(cfg, progress, use_cpu)
        _write_model(out_dir, cfg, state_dict, classes, arch, frozen)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    if progress:
        progress({"event": "done", "out_dir": str(out_dir)})
    return out_dir


def _plain_copy(weights: Path, out: Path) -> Path:
    """An admin's full checkpoint as a plain state dict (mmengine's loader accepts only weights)."""
    import torch

    torch.save({"state_dict": transfer.load_weights(weights, trusted=True)}, out)
    return out


def _set_threads(threads: int) -> None:
    import cv2
    import torch

    torch.set_num_threads(max(1, threads))
    cv2.setNumThreads(max(1, threads))


def _run(cfg: Any, progress: Progress | None, use_cpu: bool) -> tuple[dict, tuple[str, ...]]:
    import copy

    from mmengine.runner import Runner

    run_cfg = copy.deepcopy(cfg)
    run_cfg.test_dataloader = None  # train only; the pipeline is kept for inference
    runner = Runner.from_cfg(run_cfg)
    if use_cpu:  # the Runner puts the model on CUDA whenever it is visible
        runner.model.to("cpu")
    runner.register_hook(ProgressHook(progress), priority="LOW")
    runner.train()
    model = runner.model.module if hasattr(runner.model, "module") else runner.model
    return _final_state_dict(runner), tuple(getattr(model, "frozen_prefixes", ()))


def _final_state_dict(runner: Any) -> dict:
    """The EMA weights when the config trains with an EMAHook (as RTMDet does)."""
    from mmengine.hooks import EMAHook
    from mmengine.model import is_model_wrapper

    for hook in runner.hooks:
        if isinstance(hook, EMAHook):
            return hook.ema_model.module.state_dict()
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    return model.state_dict()


def _write_model(out_dir: Path, cfg: Any, state_dict: dict, classes: list[str], arch: str,
                 frozen: tuple[str, ...] = ()) -> None:
    """Frozen pretrained parts (``frozen``: key prefixes, e.g. sam-det's SAM encoder and decoder) are left out:
    they load from their own checkpoint, so a version holds only what training changed."""
    import torch

    for key in ("work_dir", "load_from"):
        cfg[key] = None
    cfg.dump(str(out_dir / "config.py"))
    weights = {k: v.detach().cpu() for k, v in state_dict.items() if not (frozen and k.startswith(frozen))}
    torch.save({"state_dict": weights, "meta": {"arch": arch, "classes": list(classes)}},
               out_dir / "weights.pth")
    (out_dir / "classes.json").write_text(json.dumps(list(classes)))


class ProgressHook(Hook):
    """Reports {"event": "iter", epoch, iter, max_iters, loss, eta_s} after each iteration."""

    def __init__(self, callback: Progress | None) -> None:
        self.callback = callback
        self.started = 0.0
        self.start_iter = 0

    def before_train(self, runner: Any) -> None:
        self.started, self.start_iter = time.monotonic(), runner.iter

    def after_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None,
                         outputs: dict | None = None) -> None:
        if not self.callback:
            return
        done = runner.iter + 1 - self.start_iter
        per_iter = (time.monotonic() - self.started) / max(1, done)
        loss = outputs.get("loss") if outputs else None
        self.callback({
            "event": "iter",
            "epoch": runner.epoch + 1,
            "max_epochs": runner.max_epochs,
            "iter": runner.iter + 1,
            "max_iters": runner.max_iters,
            "loss": float(loss.detach()) if loss is not None else None,
            "eta_s": round(per_iter * (runner.max_iters - runner.iter - 1), 1),
        })


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    # mmengine logs to stdout; keep stdout for our JSON lines only.
    json_out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    def emit(event: dict) -> None:
        json_out.write(json.dumps(event) + "\n")

    try:
        train(args.dataset, args.classes.split(","), args.out, args.arch, args.init_weights,
              args.epochs, args.batch_size, args.threads, emit, args.lr, args.img_size,
              args.device, args.seed, embedding_store=args.embeddings, embedding_store_mb=args.embeddings_mb,
              sam_model_type=args.sam_model_type, sam_checkpoint=args.sam_checkpoint,
              init_classes=args.init_classes.split(",") if args.init_classes else None,
              class_map=json.loads(args.class_map) if args.class_map else None, init_trusted=args.init_trusted)
    except Exception as exc:  # noqa: BLE001 - reported to the parent process
        emit({"event": "error", "error": f"{type(exc).__name__}: {exc}"})
        raise
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", type=Path, required=True, help="dir with annotations.json + images/")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--classes", help="comma-separated; default: categories of annotations.json")
    p.add_argument("--arch", default=DEFAULT_ARCH)
    p.add_argument("--init-weights", type=Path)
    p.add_argument("--init-classes", help="comma-separated classes of --init-weights, when they differ")
    p.add_argument("--class-map", help='JSON {"label": "class of --init-weights it continues"}')
    p.add_argument("--init-trusted", action="store_true", help="--init-weights is a full checkpoint you trust")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lr", type=float)
    p.add_argument("--img-size", type=int)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--embeddings", type=Path, help="shared SAM embedding store (sam-det)")
    p.add_argument("--embeddings-mb", type=int, default=2048)
    p.add_argument("--sam-model-type", default="vit_t")
    p.add_argument("--sam-checkpoint", type=Path)
    args = p.parse_args(argv)
    if not args.classes:
        coco = json.loads((args.dataset / "annotations.json").read_text())
        args.classes = ",".join(c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"]))
    return args


if __name__ == "__main__":
    sys.exit(main())
