"""How sure the publish gate is: a trained model's saving on photos its score threshold was not chosen on.

The trainer chooses each class's threshold on its held-out photos (4 of 20 annotated tasks, by default) and publishes
a version only if it saves the annotator actions there. This benchmark trains one model as the learning curve does
(photos 1-N), costs every later photo once (SAM's clicks for each object, the model's predictions, models/detection/
cost.py), then draws many random splits of those photos into "held-out" (the size the trainer would have) and "the
rest of the project". Per split and per gate it records the share of SAM-alone actions the model saves on the rest
when the gate publishes it (0 when it does not):

- ``in-sample``: the saving on the held-out photos at the thresholds chosen on them (the gate before cost.unseen);
- ``unseen``: each held-out photo costed at thresholds chosen on the others, less one standard error (the gate now);
- ``always``: no gate.

    OMP_WAIT_POLICY=PASSIVE .venv/app/bin/python benchmarks/threshold_splits.py --data ../shared/data/coco-ccby \
        --label person [--n 20] [--held 4,10,20] [--splits 100] [--work DIR]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import learning_curve  # noqa: E402

from appliance.models.detection import cost, holdout  # noqa: E402


def costed_photos(work: Path, model: Path) -> list[cost.Photo]:
    """Every evaluation photo with SAM's clicks per object and the model's predictions at any score."""
    from appliance.models.detection.model import Detector
    from appliance.models.sam.engine import SamEngine
    from appliance.models.sam.store import EmbeddingStore

    store = EmbeddingStore(work / "embeddings", 1 << 40)
    held = holdout.load(work / "eval", holdout.sam_clicks(SamEngine(device="cpu"), store))
    detector = Detector(model, device="cpu", embedding_store=work / "embeddings")
    return holdout.costed(held, holdout.predictions(detector, held))


def gates(held: list[cost.Photo]) -> dict[str, bool]:
    inside = cost.total(held, cost.choose_thresholds(held, floor=holdout.EVAL_THRESHOLD), cost.NO_PREDICTIONS)
    return {"always": True, "in-sample": inside.actions < inside.sam_only,
            "unseen": cost.unseen(held, floor=holdout.EVAL_THRESHOLD)["lower"] > 0}


def splits(photos: list[cost.Photo], size: int, count: int) -> dict[str, list[float]]:
    rng = random.Random(size)
    saved: dict[str, list[float]] = {"always": [], "in-sample": [], "unseen": []}
    for _ in range(count):
        order = rng.sample(range(len(photos)), len(photos))
        held, rest = [photos[i] for i in order[:size]], [photos[i] for i in order[size:]]
        thresholds = cost.choose_thresholds(held, floor=holdout.EVAL_THRESHOLD)
        spent = cost.total(rest, thresholds, cost.NO_PREDICTIONS)
        share = 1 - spent.actions / spent.sam_only
        for gate, publish in gates(held).items():
            saved[gate].append(share if publish else 0.0)
    return saved


def table(rows: list[tuple[int, str, list[float]]]) -> str:
    lines = ["| held-out photos | gate | mean saved | median | worst | splits costing more | splits saving |",
             "|---|---|---|---|---|---|---|"]
    for size, gate, values in rows:
        lines.append(f"| {size} | {gate} | {statistics.mean(values):+.2%} | {statistics.median(values):+.2%} | "
                     f"{min(values):+.2%} | {sum(v < 0 for v in values)} | {sum(v > 0 for v in values)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=learning_curve.DATA)
    parser.add_argument("--label")
    parser.add_argument("--arch", default="sam-prompt")
    parser.add_argument("--n", type=int, default=20, help="photos 1-N train the model")
    parser.add_argument("--held", default="4,10,20", help="held-out sizes to draw")
    parser.add_argument("--splits", type=int, default=100)
    parser.add_argument("--work", type=Path)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="threshold-splits-"))
    curve = ["--data", str(args.data), "--archs", args.arch, "--ns", str(args.n), "--eval", f"{args.n + 1}-",
             "--work", str(work)] + (["--label", args.label] if args.label else [])
    sys.argv = [sys.argv[0], *curve]
    learning_curve.main()  # trains the model, writes work/eval and the embeddings
    photos = costed_photos(work, work / f"model-{args.arch}-{args.n}")
    everything = cost.total(photos, cost.choose_thresholds(photos, floor=holdout.EVAL_THRESHOLD), cost.NO_PREDICTIONS)
    print(f"\n{len(photos)} photos after the first {args.n}, {everything.objects} objects; the best threshold chosen "
          f"on all of them saves {everything.as_dict()['saved']:.2%} of {everything.sam_only} SAM-alone actions\n")
    rows = [(size, gate, values) for size in map(int, args.held.split(","))
            for gate, values in splits(photos, size, args.splits).items()]
    print(table(rows))


if __name__ == "__main__":
    main()
