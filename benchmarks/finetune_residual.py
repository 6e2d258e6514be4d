"""Where a tuned quantized model's remaining error sits (docs/results.md, section 7; CPU, label-free part).

    .venv/bin/python benchmarks/finetune_residual.py <checkpoint> --images .carry/ft/dev/images \
        --map-data ../shared/assets/coco-calib-train/coco-calib-train.yaml --out docs/data/finetune-residual-w4a16.json

For each top-level block, the block's integer weights go back to the float model's (quantizers off) and
the head-map distortion against the float model (NMSE of box and class maps, the `distortion`
sensitivity's measure) is measured again: the share of the error that goes away is what that block still
holds. With --map-data, the same is done for the head block alone and scored by mAP50-95, an upper bound
on what better head rounding could give. Run on training data only: it chooses where to look next.
"""

import argparse
import copy
from pathlib import Path

import torch

from lowbit.data.datasets import load_dataset
from lowbit.data.loader import make_batches
from lowbit.evaluate.coco import evaluate
from lowbit.io import write_json
from lowbit.models.ultralytics import load_detector
from lowbit.quantize.apply import load_quantized
from lowbit.quantize.manifest import Manifest
from lowbit.sensitivity.distortion import _head_maps, _nmse


def float_block(net, teacher, k: int):
    """A copy of `net` whose block k has the teacher's float weights and no weight quantizers."""
    q = copy.deepcopy(net)
    t = dict(teacher.named_modules())
    n = 0
    for name, mod in q.model[k].named_modules():
        wq = getattr(mod, "weight_quantizer", None)
        if wq is not None and wq.is_enabled:
            wq.disable()
            mod.weight.data.copy_(t[f"model.{k}.{name}"].weight.data)
            n += 1
    return q, n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--images", required=True, help="images for the head-map distortion (not evaluation images)")
    ap.add_argument("--max-images", type=int, default=32)
    ap.add_argument("--map-data", help="labelled training set: mAP with the head block float")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    m = Manifest.load(Path(a.checkpoint) / "manifest.json")
    det = load_detector(m.model, m.imgsz)
    net, m = load_quantized(a.checkpoint, det)
    batches = make_batches(load_dataset(a.images).subset(a.max_images), m.imgsz, 8, progress=False)
    with torch.no_grad():
        refs = [_head_maps(det.net(b.images)) for b in batches]

    def distortion(q):
        box = cls = 0.0
        with torch.no_grad():
            for b, (rb, rc) in zip(batches, refs):
                ob, oc = _head_maps(q(b.images))
                box += _nmse(rb, ob) / len(batches)
                cls += _nmse(rc, oc) / len(batches)
        return box, cls

    full = distortion(net)
    rows = []
    for k, block in enumerate(net.model):
        q, n = float_block(net, det.net, k)
        if not n:
            continue
        box, cls = distortion(q)
        rows.append({"block": k, "type": type(block).__name__, "box_nmse": box, "cls_nmse": cls,
                     "box_share": 1 - box / full[0], "cls_share": 1 - cls / full[1]})
        print(f"block {k:2d} {rows[-1]['type']:10s} box share {rows[-1]['box_share']:+.3f} "
              f"class share {rows[-1]['cls_share']:+.3f}", flush=True)
    out = {"checkpoint": a.checkpoint, "images": a.images, "max_images": a.max_images,
           "all_quantized": {"box_nmse": full[0], "cls_nmse": full[1]}, "blocks": rows}
    if a.map_data:
        data = load_dataset(a.map_data)
        head_float, _ = float_block(net, det.net, len(net.model) - 1)
        out["map"] = {"data": a.map_data, **{name: evaluate(model, data, det.names, m.imgsz, 8, progress=False).map50_95
                                              for name, model in (("float", det.net), ("quantized", net),
                                                                  ("head_float", head_float))}}
        print("mAP50-95", out["map"], flush=True)
    write_json(a.out, out)


if __name__ == "__main__":
    main()
