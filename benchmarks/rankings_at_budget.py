"""Which sensitivity ranking and which INT4 rounding allocate best at one budget (docs/results.md, section 4).

    .venv/bin/python benchmarks/rankings_at_budget.py --report runs/study-yolov10n/cache/sensitivity-*/gradient \
        --report docs/data/yolov10n-gradient-selfsup-h100.json --clip gptq --clip output+gptq --budget 5.6

Reports are sensitivity method folders (from `lowbit sensitivity` or a study's cache); evaluation on the
shared coco-val200, calibration on 64 coco-calib-train images, CPU.
"""

import argparse
import glob

from lowbit.data.datasets import load_dataset
from lowbit.data.loader import make_batches
from lowbit.evaluate.coco import evaluate
from lowbit.models.ultralytics import load_detector
from lowbit.quantize.apply import apply_manifest
from lowbit.search import allocate
from lowbit.sensitivity.report import SensitivityReport

SHARED = "../shared/assets"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--report", action="append", required=True)
    ap.add_argument("--clip", action="append", default=None)
    ap.add_argument("--budget", type=float, default=5.6)
    a = ap.parse_args()
    det = load_detector(f"{SHARED}/models/yolov10n/yolov10n.pt")
    cal = make_batches(load_dataset(f"{SHARED}/coco-calib-train/coco-calib-train.yaml").subset(64), batch_size=8)
    ds = load_dataset(f"{SHARED}/coco-val200/coco-val200.yaml")
    eb = make_batches(ds, batch_size=8)
    for pattern in a.report:
        for src in glob.glob(pattern):
            for clip in a.clip or ["gptq"]:
                p = allocate.Problem(SensitivityReport.load(src), ["W4A16", "W8A16"], weight_clip=clip)
                m = allocate.budget(p, a.budget)
                r = evaluate(apply_manifest(det, m, cal), ds, det.names, batches=eb, progress=False)
                print(f"{src}\t{clip}\tINT4 {m.stats.int4_share:.3f}\tmAP50-95 {r.map50_95:.4f}", flush=True)


if __name__ == "__main__":
    main()
