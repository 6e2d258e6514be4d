"""PTQ of one scheme by calibration draw: how much the 64 images GPTQ calibrates on move the result
(docs/results.md, section 7, "the calibration draw"; CPU).

    .venv/bin/python benchmarks/ptq_calibration_draws.py .carry/ft/schemes/budget-5.6.json \
        --calib .carry/ft/train/images ../shared/assets/coco-calib-train/images --seeds 0 1 2 3 \
        --data ../shared/assets/coco-val200/coco-val200.yaml --out docs/data/<name>.json [--clips gptq gptq-seq] \
        [--range full]

Each folder is drawn from as lowbit draws everywhere (`Dataset.subset(n, seed)`); `--seeds all` calibrates
on every image of the folder. The scheme is a manifest or a format name (W4A16). Only measures: nothing is
chosen on the evaluation images.
"""

import argparse
import time

import torch

from lowbit.data.datasets import load_dataset
from lowbit.data.loader import make_batches
from lowbit.evaluate.coco import evaluate
from lowbit.io import write_json
from lowbit.models.ultralytics import load_detector
from lowbit.quantize.apply import apply_manifest, save_quantized
from lowbit.quantize.manifest import Manifest


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("scheme", help="manifest .json or format name")
    ap.add_argument("--calib", nargs="+", required=True, help="calibration image folders")
    ap.add_argument("--seeds", nargs="+", default=["0"], help="draw seeds, or 'all' for the whole folder")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--clips", nargs="+", default=[None],
                    help="weight rounding methods to compare (gptq, gptq-seq, ...); default: the scheme's own")
    ap.add_argument("--range", choices=["absmax", "full"], help="integer weight scales; default: the scheme's")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data", help="labelled evaluation set (without it, only --save)")
    ap.add_argument("--save", help="also save each quantized model here (<clip>-<seed>), e.g. to score elsewhere")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    det = load_detector("lowbit/assets/yolov10n.pt")
    det.net.to(a.device)
    val = load_dataset(a.data) if a.data else None
    val_b = make_batches(val, batch_size=8) if val else None
    rows = []
    for folder in a.calib:
        pool = load_dataset(folder)
        for seed in a.seeds:
            calib = pool if seed == "all" else pool.subset(a.images, seed=int(seed))
            calib_b = make_batches(calib, batch_size=8)
            for clip in a.clips:
                m = (Manifest.load(a.scheme) if a.scheme.endswith(".json")
                     else Manifest.uniform(det.source, det.layers(), a.scheme))
                m.model = det.source
                m.weight_clip = clip or m.weight_clip
                m.weight_range = a.range or m.weight_range
                t = time.perf_counter()
                net = apply_manifest(det, m, calib_b)
                ptq_s = time.perf_counter() - t
                if a.save:
                    save_quantized(net.cpu(), m, f"{a.save}/{m.weight_clip}-{seed}")
                    net.to(a.device)
                r = evaluate(net, val, det.names, batch_size=8, device=a.device, batches=val_b,
                             progress=False).map50_95 if val else None
                rows.append({"calib": folder, "seed": seed, "images": len(calib.images), "clip": m.weight_clip,
                             "range": m.weight_range,
                             "map50_95": r, "ptq_seconds": round(ptq_s, 1), "device": a.device})
                print(f"{folder} seed {seed} ({len(calib.images)} images) {m.weight_clip}: {r} "
                      f"(PTQ {ptq_s:.0f} s)", flush=True)
            write_json(a.out, {"scheme": m.name, "data": a.data, "rows": rows})  # each row kept as it comes


if __name__ == "__main__":
    main()
