"""PTQ of one scheme by calibration draw: how much the 64 images GPTQ calibrates on move the result
(docs/results.md, section 7, "the calibration draw"; CPU).

    .venv/bin/python benchmarks/ptq_calibration_draws.py .carry/ft/schemes/budget-5.6.json \
        --calib .carry/ft/train/images ../shared/assets/coco-calib-train/images --seeds 0 1 2 3 \
        --data ../shared/assets/coco-val200/coco-val200.yaml --out docs/data/<name>.json

Each folder is drawn from as lowbit draws everywhere (`Dataset.subset(n, seed)`); `--seeds all` calibrates
on every image of the folder. The scheme is a manifest or a format name (W4A16). Only measures: nothing is
chosen on the evaluation images.
"""

import argparse
import time

from lowbit.data.datasets import load_dataset
from lowbit.data.loader import make_batches
from lowbit.evaluate.coco import evaluate
from lowbit.io import write_json
from lowbit.models.ultralytics import load_detector
from lowbit.quantize.apply import apply_manifest
from lowbit.quantize.manifest import Manifest


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("scheme", help="manifest .json or format name")
    ap.add_argument("--calib", nargs="+", required=True, help="calibration image folders")
    ap.add_argument("--seeds", nargs="+", default=["0"], help="draw seeds, or 'all' for the whole folder")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--data", required=True, help="labelled evaluation set")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    det = load_detector("lowbit/assets/yolov10n.pt")
    val = load_dataset(a.data)
    val_b = make_batches(val, batch_size=8)
    rows = []
    for folder in a.calib:
        pool = load_dataset(folder)
        for seed in a.seeds:
            calib = pool if seed == "all" else pool.subset(a.images, seed=int(seed))
            m = (Manifest.load(a.scheme) if a.scheme.endswith(".json")
                 else Manifest.uniform(det.source, det.layers(), a.scheme))
            m.model = det.source
            t = time.perf_counter()
            net = apply_manifest(det, m, make_batches(calib, batch_size=8))
            r = evaluate(net, val, det.names, batch_size=8, batches=val_b, progress=False).map50_95
            rows.append({"calib": folder, "seed": seed, "images": len(calib.images), "map50_95": r,
                         "seconds": round(time.perf_counter() - t, 1)})
            print(f"{folder} seed {seed} ({len(calib.images)} images): {r:.4f}", flush=True)
            write_json(a.out, {"scheme": m.name, "data": a.data, "rows": rows})  # each row kept as it comes


if __name__ == "__main__":
    main()
