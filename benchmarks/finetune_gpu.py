"""Distillation fine-tuning vs block-wise reconstruction on YOLOv10n, on the H100 (docs/results.md, section 7).

    bash benchmarks/finetune_gpu.sh            # on the lent GPU machine; see that script for the carried files

Training images: the 256 coco-calib-train images that are not held out (.carry/ft/train, no labels read). Variants are chosen on 32
other, labelled coco-calib-train images (.carry/ft/dev); coco-val200 is never seen here: the best variant
of each scheme comes back as a checkpoint and is evaluated on coco-val200 on the CPU (a carry made with
make_ft_carry.py --train-on-held-out trains on all 288 and holds nothing out: pass --save-all):

    .venv/bin/lowbit eval -m <returned checkpoint folder> -d ../shared/assets/coco-val200/coco-val200.yaml --batch 8
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
from lowbit.finetune.distill import FinetuneConfig, finetune
from lowbit.models.ultralytics import load_detector
from lowbit.quantize.apply import apply_manifest, load_quantized, save_quantized
from lowbit.quantize.manifest import Manifest

VARIANTS = {
    "distill-e10-lr1e-5": FinetuneConfig(epochs=10, lr=1e-5, batch=16),
    "distill-e10-lr1e-4": FinetuneConfig(epochs=10, lr=1e-4, batch=16),
    "distill-e10-lr1e-5-lsq": FinetuneConfig(epochs=10, lr=1e-5, batch=16, learn_scales=True),
    "distill-e10-lr1e-5-feat": FinetuneConfig(epochs=10, lr=1e-5, batch=16, feature_weight=1.0),
    "distill-e30-lr1e-5": FinetuneConfig(epochs=30, lr=1e-5, batch=16),
    "distill-e60-lr1e-4": FinetuneConfig(epochs=60, lr=1e-4, batch=16),
    "distill-e60-lr1e-4-lsq": FinetuneConfig(epochs=60, lr=1e-4, batch=16, learn_scales=True),
    "distill-e60-lr3e-5": FinetuneConfig(epochs=60, lr=3e-5, batch=16),
    "distill-e60-lr3e-5-aug": FinetuneConfig(epochs=60, lr=3e-5, batch=16, scale_jitter=0.4, color_jitter=0.3),
    "distill-e60-lr1e-4-aug": FinetuneConfig(epochs=60, lr=1e-4, batch=16, scale_jitter=0.4, color_jitter=0.3),
    "distill-e120-lr3e-5-aug": FinetuneConfig(epochs=120, lr=3e-5, batch=16, scale_jitter=0.4, color_jitter=0.3),
    "blocks-200-lr1e-4": FinetuneConfig(mode="blocks", block_steps=200, lr=1e-4, batch=16),
    "blocks-200-lr1e-5": FinetuneConfig(mode="blocks", block_steps=200, lr=1e-5, batch=16),
    "adaround-nearest-500": FinetuneConfig(mode="adaround", block_steps=500, batch=16, round_start="nearest"),
    "adaround-nearest-1500": FinetuneConfig(mode="adaround", block_steps=1500, batch=16, round_start="nearest"),
    "adaround-nearest-1000-lr1e-2": FinetuneConfig(mode="adaround", block_steps=1000, batch=16, round_lr=1e-2,
                                                   round_start="nearest"),
    "adaround-1000-lr1e-2": FinetuneConfig(mode="adaround", block_steps=1000, batch=16, round_lr=1e-2),  # from GPTQ
    "adaround-1000-lr1e-2-flip": FinetuneConfig(mode="adaround", block_steps=1000, batch=16, round_lr=1e-2,
                                                flip_copies=True),
    "adaround-2000-lr1e-2": FinetuneConfig(mode="adaround", block_steps=2000, batch=16, round_lr=1e-2),
    "adaround-1000-lr1e-2-bias": FinetuneConfig(mode="adaround", block_steps=1000, batch=16, round_lr=1e-2,
                                                round_bias=True, lr=1e-4),
    "global-e60-lr1e-3-aug": FinetuneConfig(mode="adaround-global", epochs=60, batch=16, round_lr=1e-3,
                                            scale_jitter=0.4, color_jitter=0.3),
    "global-e60-lr1e-3-aug-bias": FinetuneConfig(mode="adaround-global", epochs=60, batch=16, round_lr=1e-3,
                                                 scale_jitter=0.4, color_jitter=0.3, round_bias=True, lr=1e-5),
    # from the block-wise result (margin 0.25 from each choice), 1e-3 moved no rounding across in 960 steps
    "global-e60-lr1e-2-aug": FinetuneConfig(mode="adaround-global", epochs=60, batch=16, round_lr=1e-2,
                                            scale_jitter=0.4, color_jitter=0.3),
    "global-e60-lr3e-3-aug": FinetuneConfig(mode="adaround-global", epochs=60, batch=16, round_lr=3e-3,
                                            scale_jitter=0.4, color_jitter=0.3),
    "global-e60-lr1e-2": FinetuneConfig(mode="adaround-global", epochs=60, batch=16, round_lr=1e-2),
    "adaround-1000-lr1e-2-step1e-4": FinetuneConfig(mode="adaround", block_steps=1000, batch=16, round_lr=1e-2,
                                                    learn_scales=True, lr=1e-4),
    "adaround-1000-lr1e-2-step1e-3": FinetuneConfig(mode="adaround", block_steps=1000, batch=16, round_lr=1e-2,
                                                    learn_scales=True, lr=1e-3),
    # twice and half the steps per block: uniform INT4 falls short on the very images it was tuned on
    "adaround-2000-lr1e-2-step1e-3": FinetuneConfig(mode="adaround", block_steps=2000, batch=16, round_lr=1e-2,
                                                    learn_scales=True, lr=1e-3),
    "adaround-250-lr1e-2-step1e-3": FinetuneConfig(mode="adaround", block_steps=250, batch=16, round_lr=1e-2,
                                                   learn_scales=True, lr=1e-3),
    "adaround-750-lr1e-2-step1e-3": FinetuneConfig(mode="adaround", block_steps=750, batch=16, round_lr=1e-2,
                                                   learn_scales=True, lr=1e-3),
    "adaround-500-lr1e-2-step1e-3-msefisher": FinetuneConfig(mode="adaround", block_steps=500, batch=16,
                                                             round_lr=1e-2, learn_scales=True, lr=1e-3,
                                                             block_loss="mse+fisher"),
    "adaround-500-lr1e-2": FinetuneConfig(mode="adaround", block_steps=500, batch=16, round_lr=1e-2),
    "adaround-500-lr1e-2-step1e-3": FinetuneConfig(mode="adaround", block_steps=500, batch=16, round_lr=1e-2,
                                                   learn_scales=True, lr=1e-3),
    "adaround-500-lr1e-2-msefisher": FinetuneConfig(mode="adaround", block_steps=500, batch=16, round_lr=1e-2,
                                                    block_loss="mse+fisher"),
    # 768 mosaics of the 256 training images beside them (1024 in all)
    "adaround-1000-lr1e-2-mosaic768": FinetuneConfig(mode="adaround", block_steps=1000, batch=16, round_lr=1e-2,
                                                     mosaic=768),
    "adaround-2000-lr1e-2-mosaic768": FinetuneConfig(mode="adaround", block_steps=2000, batch=16, round_lr=1e-2,
                                                     mosaic=768),
    "adaround-1000-lr1e-2-step1e-3-mosaic768": FinetuneConfig(mode="adaround", block_steps=1000, batch=16,
                                                              round_lr=1e-2, learn_scales=True, lr=1e-3, mosaic=768),
    # block errors weighted by label-free Fisher weights through the float rest of the network (lowbit.finetune.fisher)
    "adaround-1000-lr1e-2-fisher": FinetuneConfig(mode="adaround", block_steps=1000, batch=16, round_lr=1e-2,
                                                  block_loss="fisher"),
    "adaround-1000-lr1e-2-msefisher": FinetuneConfig(mode="adaround", block_steps=1000, batch=16, round_lr=1e-2,
                                                     block_loss="mse+fisher"),
    "adaround-1000-lr1e-2-step1e-3-fisher": FinetuneConfig(mode="adaround", block_steps=1000, batch=16, round_lr=1e-2,
                                                           learn_scales=True, lr=1e-3, block_loss="fisher"),
    "adaround-1000-lr1e-2-step1e-3-msefisher": FinetuneConfig(mode="adaround", block_steps=1000, batch=16,
                                                              round_lr=1e-2, learn_scales=True, lr=1e-3,
                                                              block_loss="mse+fisher"),
    # learned steps and biases beside the rounding: the per-channel mean shift that rounding leaves
    # (bias correction), at the steps' learning rate
    "adaround-1000-lr1e-2-step1e-3-bias": FinetuneConfig(mode="adaround", block_steps=1000, batch=16, round_lr=1e-2,
                                                         learn_scales=True, round_bias=True, lr=1e-3),
    # a flipped copy of every training image beside it: twice the inputs for the same steps
    "adaround-500-lr1e-2-step1e-3-flip": FinetuneConfig(mode="adaround", block_steps=500, batch=16, round_lr=1e-2,
                                                        learn_scales=True, lr=1e-3, flip_copies=True),
    "adaround-750-lr1e-2-step1e-3-flip": FinetuneConfig(mode="adaround", block_steps=750, batch=16, round_lr=1e-2,
                                                        learn_scales=True, lr=1e-3, flip_copies=True),
}


def variant(name: str) -> FinetuneConfig:
    """A variant by name; `<variant>-seed<N>` is the same recipe with another sampling order (the run-to-run
    spread that any gain must exceed)."""
    base, sep, seed = name.rpartition("-seed")
    if sep and seed.isdigit() and base in VARIANTS:
        return VARIANTS[base].model_copy(update={"seed": int(seed)})
    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)} (each may end in -seed<N>)")
    return VARIANTS[name]
# "a>b": variant b fine-tunes the result of variant a (AdaRound's rounding, then distillation on top); a chain
# whose first stages were already run for this scheme starts from their result instead of running them again


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--schemes", default="W4A16,.carry/ft/schemes/budget-5.6.json,.carry/ft/schemes/budget-4.5.json",
                    help="format names, manifests, or checkpoint folders (a returned best: variants continue from it)")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma-separated; a>b chains b after a; empty with --save-ptq: PTQ alone")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-train", type=int, default=None, help="fewer training images, for a smoke run")
    ap.add_argument("--save-all", action="store_true",
                    help="return every variant's checkpoint (<scheme>-<variant>), not only the best, e.g. for a seed study")
    ap.add_argument("--calib-images", type=int, default=64, help="training images GPTQ and ModelOpt calibrate on")
    ap.add_argument("--calib-seed", type=int, default=0, help="which draw of --calib-images (Dataset.subset's seed)")
    ap.add_argument("--calib-dir", help="calibrate on every image of this folder instead (make_ft_carry.py --calib-originals)")
    ap.add_argument("--clip", help="integer weight rounding before fine-tuning (gptq, gptq-seq, ...); default: the scheme's")
    ap.add_argument("--range", choices=["absmax", "full"],
                    help="integer weight scales (Manifest.weight_range); default: the scheme's")
    ap.add_argument("--save-ptq", action="store_true", help="also return the PTQ start as <scheme>-ptq")
    a = ap.parse_args()
    names = [v for v in a.variants.split(",") if v]
    if not names and not a.save_ptq:
        raise SystemExit("no --variants: pass --save-ptq to return the PTQ starts alone")
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
        raise SystemExit("no held-out images in the carry (.carry/ft/dev) to choose the best variant by: pass --save-all")
    print("FP32 dev mAP", _fmt(dev_map(det.net)), flush=True)
    for spec in a.schemes.split(","):
        t = time.perf_counter()
        if os.path.isdir(spec):  # a checkpoint this script returned: its fine-tune is the first stage of each chain
            base, m = load_quantized(spec, det)
            base.to(dev)
        else:
            m = Manifest.load(spec) if spec.endswith(".json") else Manifest.uniform(det.source, det.layers(), spec)
            m.model = det.source
            m.weight_clip = a.clip or m.weight_clip
            m.weight_range = a.range or m.weight_range
            base = apply_manifest(det, m, calib)
            if a.save_ptq:
                save_quantized(copy.deepcopy(base).cpu(), m, f"{a.out}/{m.name.replace('.', '_')}-ptq")
        ptq_s = time.perf_counter() - t
        prior = m.origin.get("finetune", {})
        before = dev_map(base)
        print(f"{m.name}: INT4 {m.stats.int4_share:.2f}, PTQ {ptq_s:.1f} s, dev mAP {_fmt(before)}", flush=True)
        best = (before, "none")
        done = {}  # chain -> (its network, its stages' results), so "a>b" reuses a's run
        for name in names:
            parts = name.split(">")
            k = max((i for i in range(len(parts)) if ">".join(parts[:i]) in done), default=0)
            net, stages = (copy.deepcopy(base), []) if k == 0 else copy.deepcopy(done[">".join(parts[:k])])
            for i, part in enumerate(parts[k:], k + 1):
                cfg = variant(part)
                batches = make_batches(train, batch_size=cfg.batch)
                stages.append(finetune(net, det.net, batches, cfg, dev, progress=False))  # its timer syncs the GPU
                done[">".join(parts[:i])] = (copy.deepcopy(net), list(stages))
            res = stages[-1].model_copy(update={"mode": ">".join(r.mode for r in stages),
                                                "steps": sum(r.steps for r in stages),
                                                "seconds": sum(r.seconds for r in stages),
                                                "first_loss": stages[0].first_loss})
            after = dev_map(net)
            rec = {"scheme": m.name, "variant": ">".join(filter(None, [prior.get("variant"), name])), "dev_before": before, "dev_after": after, **res.model_dump(),
                   "train_images": len(train), "calib_images": len(calib_set.images), "calib_dir": a.calib_dir,
                   "weight_clip": m.weight_clip, "weight_range": m.weight_range,
                   "calib_seed": None if a.calib_dir or len(calib_set.images) == len(train.images) else a.calib_seed,
                   "gpu": torch.cuda.get_device_name() if dev == "cuda" else "cpu"}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(f"  {name}: {res.steps} steps {res.seconds:.1f} s, loss {res.first_loss:.4g} -> {res.last_loss:.4g}, "
                  f"dev mAP {_fmt(after)}" + (f" ({(after - before) * 100:+.2f})" if held else ""), flush=True)
            tuned = m.model_copy(update={"origin": {**m.origin, "finetune": {
                "variant": rec["variant"], "stages": prior.get("stages", []) + [variant(v).model_dump() for v in parts]}}})
            if a.save_all:
                save_quantized(copy.deepcopy(net).cpu(), tuned, f"{a.out}/{m.name.replace('.', '_')}-{name.replace('>', '_')}")
            if held and after > best[0]:
                best = (after, name)
                # saved at once, so a run cut off by the device's time limit still returns its best so far
                # (--save-all saved it above; a second copy would take one of the few files a run returns)
                if not a.save_all:
                    save_quantized(net.cpu(), tuned, f"{a.out}/{m.name.replace('.', '_')}")  # net is not run again
        if held:
            print(f"{m.name}: kept {best[1]} (dev mAP {best[0]:.4f})", flush=True)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


if __name__ == "__main__":
    main()
