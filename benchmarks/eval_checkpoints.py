"""mAP of many quantized checkpoints on one labelled set, in one process (docs/results.md, section 7).

    python3 benchmarks/eval_checkpoints.py <folder holding checkpoint folders> ... --data <yaml> --out <json>

Scores every lowbit checkpoint folder (modelopt.pth + manifest.json) found one level down; the JSON is
rewritten after each, and a checkpoint already in it is skipped, so a run cut off goes on where it stopped.
Runs on the lent GPU (coco-val200 carried) or on the CPU (`--device cpu`).
"""

import argparse
import os
import time
from pathlib import Path

import torch

from lowbit.data.datasets import load_dataset
from lowbit.data.loader import make_batches
from lowbit.evaluate.coco import evaluate
from lowbit.io import read_json, write_json
from lowbit.models.ultralytics import load_detector
from lowbit.quantize.apply import load_quantized


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("roots", nargs="+")
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--fp32", action="store_true", help="score the float model too, on the same device")
    a = ap.parse_args()
    det = load_detector("lowbit/assets/yolov10n.pt")
    val = load_dataset(a.data)
    batches = make_batches(val, batch_size=8)
    scores = read_json(a.out)["scores"] if os.path.isfile(a.out) else {}
    if a.fp32 and "fp32" not in scores:
        scores["fp32"] = evaluate(det.net.to(a.device), val, det.names, batch_size=8, device=a.device, batches=batches,
                                  progress=False).map50_95
        det.net.cpu()
    folders = sorted(p.parent for root in a.roots for p in Path(root).glob("*/modelopt.pth"))
    for f in folders:
        if str(f) in scores:
            continue
        t = time.perf_counter()
        net, _ = load_quantized(f, det)
        r = evaluate(net.to(a.device), val, det.names, batch_size=8, device=a.device, batches=batches, progress=False)
        scores[str(f)] = r.map50_95
        print(f"{f}: {r.map50_95:.4f} ({time.perf_counter() - t:.0f} s)", flush=True)
        write_json(a.out, {"data": a.data, "device": a.device, "scores": scores})


if __name__ == "__main__":
    main()
