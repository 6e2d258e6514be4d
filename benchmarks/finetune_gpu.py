"""Block-wise AdaRound of YOLOv10n schemes on the lent GPU (docs/results.md, "Fine-tuning").

    bash benchmarks/finetune_gpu.sh            # on the lent GPU machine; see that script for the carried files

Training images: the coco-calib-train images of the carry (.carry/ft/train, no labels read); 32 other, labelled
coco-calib-train images (.carry/ft/dev) score each run when the carry holds them out (a carry made with
make_ft_carry.py --train-on-held-out trains on all 288 and holds nothing out: pass --save-all). coco-val200 and
coco-val800 are never seen here: returned checkpoints are evaluated on the CPU:

    .venv/bin/lowbit eval -m <returned checkpoint folder> -d ../shared/assets/coco-val800/coco-val800.yaml --batch 8
"""

import argparse
import copy
import json
import os
import time

import torch

from lowbit.data.datasets import load_dataset
from lowbit.data.loader import make_batches
from lowbit.evaluate.coco import evaluate
from lowbit.finetune.blockwise import RECIPES, finetune
from lowbit.models.ultralytics import load_detector
from lowbit.quantize.apply import apply_manifest, load_quantized, save_quantized
from lowbit.quantize.manifest import Manifest


def recipe(name: str):
    """A recipe by name; `<recipe>-seed<N>` is the same recipe with another batch order (the run-to-run spread
    that any gain must exceed)."""
    base, sep, seed = name.rpartition("-seed")
    if sep and seed.isdigit() and base in RECIPES:
        return RECIPES[base].model_copy(update={"seed": int(seed)})
    if name not in RECIPES:
        raise SystemExit(f"unknown recipe {name!r}; known: {', '.join(RECIPES)} (each may end in -seed<N>)")
    return RECIPES[name]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--schemes", default="W4A16,.carry/ft/schemes/budget-5.6.json,.carry/ft/schemes/budget-4.5.json",
                    help="format names, manifests, or checkpoint folders (a returned best: recipes continue from it)")
    ap.add_argument("--recipes", default="mixed", help="comma-separated; empty with --save-ptq: PTQ alone")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-train", type=int, default=None, help="fewer training images, for a smoke run")
    ap.add_argument("--save-all", action="store_true",
                    help="return every recipe's checkpoint (<scheme>-<recipe>), not only the best, e.g. for a seed study")
    ap.add_argument("--calib-images", type=int, default=64, help="training images GPTQ and ModelOpt calibrate on")
    ap.add_argument("--calib-seed", type=int, default=0, help="which draw of --calib-images (Dataset.subset's seed)")
    ap.add_argument("--calib-dir", help="calibrate on every image of this folder instead (make_ft_carry.py --calib-originals)")
    ap.add_argument("--rounding", choices=["nearest", "gptq", "gptq-seq"],
                    help="weight rounding before fine-tuning; default: the scheme's")
    ap.add_argument("--range", choices=["absmax", "full"],
                    help="integer weight scales (Manifest.weight_range); default: the scheme's")
    ap.add_argument("--save-ptq", action="store_true", help="also return the PTQ start as <scheme>-ptq")
    a = ap.parse_args()
    names = [v for v in a.recipes.split(",") if v]
    if not names and not a.save_ptq:
        raise SystemExit("no --recipes: pass --save-ptq to return the PTQ starts alone")
    dev = a.device
    det = load_detector("lowbit/assets/yolov10n.pt")
    det.net.to(dev)
    train = load_dataset(".carry/ft/train/images").subset(a.max_train)
    # absent when the carry trains on all 288 (make_ft_carry.py --train-on-held-out): no score is then held out
    held = (load_dataset(".carry/ft/dev/annotations/instances_dev.json", ".carry/ft/dev/images")
            if os.path.isdir(".carry/ft/dev") else None)
    calib_set = load_dataset(a.calib_dir) if a.calib_dir else train.subset(a.calib_images, seed=a.calib_seed)
    calib = make_batches(calib_set, batch_size=8)
    held_b = make_batches(held, batch_size=16) if held else None
    log = open(f"{a.out}/finetune-log.jsonl", "a")

    def dev_map(net):
        if held is None:
            return None
        return evaluate(net, held, det.names, batch_size=16, device=dev, batches=held_b, progress=False).map50_95

    if held is None and not a.save_all:
        raise SystemExit("no held-out images in the carry (.carry/ft/dev) to choose the best recipe by: pass --save-all")
    print("FP32 dev mAP", _fmt(dev_map(det.net)), flush=True)
    for spec in a.schemes.split(","):
        t = time.perf_counter()
        if os.path.isdir(spec):  # a checkpoint this script returned: its fine-tune is the first stage of each chain
            base, m = load_quantized(spec, det)
            base.to(dev)
        else:
            m = Manifest.load(spec) if spec.endswith(".json") else Manifest.uniform(det.source, det.layers(), spec)
            m.model = det.source
            m.rounding = a.rounding or m.rounding
            m.weight_range = a.range or m.weight_range
            base = apply_manifest(det, m, calib)
            if a.save_ptq:
                save_quantized(copy.deepcopy(base).cpu(), m, f"{a.out}/{m.name.replace('.', '_')}-ptq")
        ptq_s = time.perf_counter() - t
        before = dev_map(base)
        print(f"{m.name}: INT4 {m.stats.int4_share:.2f}, PTQ {ptq_s:.1f} s, dev mAP {_fmt(before)}", flush=True)
        best = (before, "none")
        for name in names:
            cfg = recipe(name)
            net = copy.deepcopy(base)
            res = finetune(net, det.net, make_batches(train, batch_size=cfg.batch), cfg, dev, progress=False)
            after = dev_map(net)
            rec = {"scheme": m.name, "recipe": name, "dev_before": before, "dev_after": after, **res.model_dump(),
                   "train_images": len(train), "calib_images": len(calib_set.images), "calib_dir": a.calib_dir,
                   "weight_clip": m.weight_clip, "rounding": m.rounding, "weight_range": m.weight_range,
                   "calib_seed": None if a.calib_dir or len(calib_set.images) == len(train.images) else a.calib_seed,
                   "gpu": torch.cuda.get_device_name() if dev == "cuda" else "cpu"}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(f"  {name}: {res.steps} steps {res.seconds:.1f} s, loss {res.first_loss:.4g} -> {res.last_loss:.4g}, "
                  f"dev mAP {_fmt(after)}" + (f" ({(after - before) * 100:+.2f})" if held else ""), flush=True)
            tuned = m.model_copy(update={"origin": {**m.origin, "finetune": {"recipe": name, **cfg.model_dump()}}})
            if a.save_all:
                save_quantized(copy.deepcopy(net).cpu(), tuned, f"{a.out}/{m.name.replace('.', '_')}-{name}")
            if held and after > best[0]:
                best = (after, name)
                # saved at once, so a run cut off by the device's time limit still returns its best so far
                if not a.save_all:
                    save_quantized(net.cpu(), tuned, f"{a.out}/{m.name.replace('.', '_')}")
        if held:
            print(f"{m.name}: kept {best[1]} (dev mAP {best[0]:.4f})", flush=True)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


if __name__ == "__main__":
    main()
