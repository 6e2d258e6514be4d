"""Fine-tuning time on YOLOv10m (from yaml: structure and cost, not accuracy) on the H100 (docs/results.md, 7).

    source benchmarks/device_setup.sh; python3 benchmarks/finetune_time_v10m_gpu.py   (on the H100; carry .whl, .carry/ft)

Uniform W4A16 (ModelOpt max calibration on 16 images), the carried training images (.carry/ft/train) at
batch 16: AdaRound block reconstruction for a few hundred steps per block (block loss MSE, then MSE + Fisher)
and distillation for a few epochs, timed (the fine-tuner syncs the GPU), so the per-step cost extrapolates
to the step counts used on YOLOv10n.
"""

import copy
import json
import os

import torch

from lowbit.data.datasets import load_dataset
from lowbit.data.loader import make_batches
from lowbit.finetune.distill import FinetuneConfig, finetune
from lowbit.models.ultralytics import load_detector
from lowbit.quantize.apply import apply_manifest
from lowbit.quantize.manifest import Manifest


def main():
    det = load_detector("yolov10m.yaml")
    det.net.cuda()
    train = load_dataset(".carry/ft/train/images")
    batches = make_batches(train, batch_size=16)
    m = Manifest.uniform("yolov10m.yaml", det.layers(), "W4A16", weight_clip="max")
    base = apply_manifest(det, m, batches[:1])
    out = {"gpu": torch.cuda.get_device_name(), "model": "yolov10m.yaml", "scheme": "W4A16", "images": len(train), "runs": []}
    # a short untimed run first: on the H100 the first fine-tune of a process took 110 s where the same run
    # after it took 41 s, a one-time start-up cost that is not per step. The Fisher weights cost once per
    # block, not per step either: a run with them minus one without is that cost.
    finetune(copy.deepcopy(base), det.net, batches, FinetuneConfig(mode="adaround", block_steps=20, batch=16), "cuda",
             progress=False)
    for cfg in (FinetuneConfig(mode="adaround", block_steps=200, batch=16, round_lr=1e-2),
                FinetuneConfig(mode="adaround", block_steps=200, batch=16, round_lr=1e-2, block_loss="mse+fisher"),
                FinetuneConfig(mode="distill", epochs=5, batch=16, lr=3e-5, scale_jitter=0.4, color_jitter=0.3)):
        net = copy.deepcopy(base)
        res = finetune(net, det.net, batches, cfg, "cuda", progress=False)
        row = {**res.model_dump(), "config": cfg.model_dump(), "ms_per_step": 1e3 * res.seconds / res.steps,
               "peak_gb": torch.cuda.max_memory_allocated() / 1e9}
        out["runs"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "config"}), flush=True)
        del net
        torch.cuda.empty_cache()
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "finetune-time-v10m.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
