"""The most any SAM-mask pre-annotation can save the annotator: a perfect detector, measured by the cost model.

For each object of the scored photos, the "perfect detector" knows where it is and shows SAM's mask prompted with the
object's true box (or at its most interior point, whichever matches better), and only when that mask would be kept
(IoU >= 0.85): it never shows a prediction to delete. Every other object costs its SAM clicks from nothing (the
simulated annotator of appliance.models.sam.annotator, at most 20), every photo its submit. This is the floor of the
annotator's cost for any detector whose masks are SAM's (sam-prompt, sam-det): the trainer's gate and
benchmarks/project_sim.py use the same cost model (appliance.models.detection.cost).

Printed per object size (COCO's small < 32x32 px, medium < 96x96, large): objects, SAM's clicks alone, objects that
never reach IoU 0.85 in 20 clicks, objects the perfect detector gets kept, and the actions with and without it.

    OMP_WAIT_POLICY=PASSIVE .venv/app/bin/python benchmarks/cost_ceiling.py --data coco-ccby --label person \
        [--photos 21-] [--step 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SIZES = (("small", 0, 32 ** 2), ("medium", 32 ** 2, 96 ** 2), ("large", 96 ** 2, float("inf")))


def measure(engine, image: np.ndarray, masks: list[np.ndarray]) -> list[dict]:
    """Per object: its area, SAM's clicks alone, and the best IoU of SAM's mask from its true box or its interior
    point (what a perfect detector could show)."""
    from appliance.models.sam.annotator import EngineClicks, interior, iou
    from appliance.models.sam.seeds import mask_box

    embedding = engine.embed(image)
    clicker = EngineClicks(engine, embedding)
    rows = []
    for mask in masks:
        from_box = iou(engine.decode(embedding, box=mask_box(mask)).mask, mask)
        from_point = iou(engine.decode(embedding, [interior(mask)[0]], [1]).mask, mask)
        rows.append({"area": int(mask.sum()), "clicks": clicker.clicks(mask), "best_iou": max(from_box, from_point)})
    return rows


def summarise(rows: list[dict], photos: int) -> list[dict]:
    from appliance.models.sam.annotator import KEEP_IOU, MAX_CLICKS

    lines = []
    for name, low, high in SIZES + (("all", 0, float("inf")),):
        part = [r for r in rows if low <= r["area"] < high]
        submits = photos if name == "all" else 0
        clicks = sum(r["clicks"] for r in part)
        kept = [r for r in part if r["best_iou"] >= KEEP_IOU]
        lines.append({"size": name, "objects": len(part), "sam_clicks": clicks,
                      "stuck": sum(r["clicks"] >= MAX_CLICKS for r in part), "keepable": len(kept),
                      "mean_iou": round(float(np.mean([r["best_iou"] for r in part])), 3) if part else 0.0,
                      "sam_only": clicks + submits,
                      "perfect": clicks - sum(r["clicks"] for r in kept) + submits})
    return lines


def table(lines: list[dict]) -> str:
    out = ["| objects | n | SAM clicks | never reach 0.85 in 20 clicks | perfect detector's SAM mask: mean IoU | "
           "kept | actions, SAM alone | actions, perfect detector | ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for line in lines:
        ratio = line["perfect"] / line["sam_only"] if line["sam_only"] else 1.0
        out.append(f"| {line['size']} | {line['objects']} | {line['sam_clicks']} | {line['stuck']} | "
                   f"{line['mean_iou']:.3f} | {line['keepable']} | {line['sam_only']} | {line['perfect']} | "
                   f"{ratio:.2f} |")
    return "\n".join(out)


def main() -> None:
    import project_sim
    import torch

    from appliance.models.sam.engine import SamEngine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="coco-ccby", choices=["coco-ccby", "nuclei"], help="a set in ../shared/data")
    parser.add_argument("--label", help="one class (default: the set's first); 'all' for every class")
    parser.add_argument("--photos", default="21-", help="1-based photo range scored (21-: the learning curve's)")
    parser.add_argument("--step", type=int, default=1, help="every k-th photo of the range only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    folder = project_sim.SHARED / args.data
    label = args.label or json.loads((folder / "annotations.json").read_text())["categories"][0]["name"]
    photos, objects = project_sim.project(args.data, label, 0)  # the photos holding the label, file order
    first, last = (int(v) if v else len(photos) for v in args.photos.split("-"))
    scored = photos[first - 1:last:args.step]
    engine = SamEngine(device="cpu")
    engine.use_onnx(None, threads=args.threads)
    began, rows = time.monotonic(), []
    for info in scored:
        image = np.asarray(Image.open(folder / "images" / info["file_name"]).convert("RGB"))
        rows += measure(engine, image, [mask for _, mask in objects[info["file_name"]]])
    lines = summarise(rows, len(scored))
    print(f"\n{args.data} '{label}', photos {first}-{last}" + (f" every {args.step}th" if args.step > 1 else "")
          + f" ({len(scored)} photos, {time.monotonic() - began:.0f} s):\n")
    print(table(lines))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "summary": lines}, indent=1))


if __name__ == "__main__":
    main()
