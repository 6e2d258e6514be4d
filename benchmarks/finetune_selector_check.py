"""Does a label-free score rank fine-tuned checkpoints as coco-val200 does? (docs/results.md, section 7)

    .venv/bin/python benchmarks/finetune_selector_check.py NAME=CHECKPOINT_FOLDER ... > scores.json

For each checkpoint: the head-map distance to the float teacher (the fine-tuning loss), averaged over images
and their flips, on the 32 held-out images of .carry/ft/dev and on 32 training images of .carry/ft/train
(both made by benchmarks/make_ft_carry.py). No coco-val200 image is read.

    .venv/bin/python benchmarks/finetune_selector_check.py --data ../shared/assets/coco-calib-train/coco-calib-train.yaml \
        NAME=CHECKPOINT_FOLDER ... > scores.json

scores a labelled set instead: the head-map distance (no flips) and the mAP on its labels, e.g. on all 288
coco-calib-train images, which a fine-tune on all of them saw without labels: can either pick the GPTQ
calibration draw that coco-val200 prefers?
"""

import argparse
import json
import sys

import torch

from lowbit.data.datasets import load_dataset
from lowbit.data.loader import make_batches
from lowbit.evaluate.coco import evaluate
from lowbit.finetune.distill import _head, head_loss
from lowbit.models.ultralytics import load_detector
from lowbit.quantize.apply import load_quantized


def distance(net, teacher, batches, flips: bool = True) -> float:
    reg_max = teacher.model[-1].reg_max
    total, n = 0.0, 0
    with torch.no_grad():
        for b in batches:
            for x in (b.images, b.images.flip(-1)) if flips else (b.images,):
                total += float(head_loss(_head(net(x)), _head(teacher(x)), reg_max)) * x.shape[0]
                n += x.shape[0]
    return total / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoints", nargs="+", metavar="NAME=CHECKPOINT_FOLDER")
    ap.add_argument("--data", help="a labelled dataset (yaml) to score instead of the carry's images")
    a = ap.parse_args()
    det = load_detector("lowbit/assets/yolov10n.pt")
    teacher = det.net.eval()
    if a.data:
        data = load_dataset(a.data)
        batches = make_batches(data, batch_size=8)
    else:
        held = make_batches(load_dataset(".carry/ft/dev/annotations/instances_dev.json", ".carry/ft/dev/images"), batch_size=8)
        train = make_batches(load_dataset(".carry/ft/train/images").subset(32), batch_size=8)
    out = {}
    for arg in a.checkpoints:
        name, path = arg.split("=", 1)
        net, _ = load_quantized(path, det)
        net.eval()
        if a.data:
            out[name] = {"dist": distance(net, teacher, batches, flips=False),
                         "map50_95": evaluate(net, data, det.names, batch_size=8, batches=batches, progress=False).map50_95}
        else:
            out[name] = {"held_dist": distance(net, teacher, held), "train32_dist": distance(net, teacher, train)}
        print(name, out[name], file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
