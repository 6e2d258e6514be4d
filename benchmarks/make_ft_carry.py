"""Build .carry/ft for benchmarks/finetune_gpu.sh: coco-calib-train images that fit the device's 64 MiB carry.

32 images (seed 0) are held out, with labels, to choose between fine-tuning variants; the next ones, in the
same shuffled order, up to 26.5 MB of JPEGs, are the training images (160 of the 256). With `--quality Q`
the training images are re-encoded as JPEG quality Q instead, so all 256 fit (q90: 23 MB); the held-out
images stay byte-identical. Scheme manifests are copied from a study's cache or from manifest files (a
recorded fine-tune is dropped, so the scheme starts from PTQ):

    python3 benchmarks/make_ft_carry.py runs/study-yolov10n/cache/eval-*/result.json
    .venv/bin/python benchmarks/make_ft_carry.py --quality 90 docs/data/budget-5.6-distilled-manifest.json

`--calib-originals N` also carries, byte-identical in .carry/ft/calib/images, the N training images that
finetune_gpu.py calibrates GPTQ on by default (`--calib-images N`, drawn with seed 0): re-encoding those at
quality 90 moved the 60% scheme's PTQ mAP by 0.79 points (docs/results.md, section 7), so `finetune_gpu.py
--calib-dir .carry/ft/calib/images` starts from the originals.
"""

import argparse
import json
import os
import random
import shutil

SRC = "../shared/assets/coco-calib-train"
DST = ".carry/ft"
WANT = {"budget-weight_bits-5.6": "budget-5.6", "budget-weight_bits-4.5": "budget-4.5"}

ap = argparse.ArgumentParser()
ap.add_argument("manifests", nargs="*")
ap.add_argument("--quality", type=int, default=None, help="re-encode the training JPEGs at this quality; take all")
ap.add_argument("--train-on-held-out", action="store_true",
                help="once a recipe is chosen: train on all 288 (the held-out 32 too, so none is carried as held out)")
ap.add_argument("--calib-originals", type=int, default=0, metavar="N",
                help="also carry the N default GPTQ calibration images unaltered, in .carry/ft/calib/images")
a = ap.parse_args()
j = json.load(open(f"{SRC}/annotations/instances_coco-calib-train.json"))
ims = sorted(j["images"], key=lambda x: x["file_name"])
random.Random(0).shuffle(ims)
held, rest = ims[:32], ims[32:]
train, total = [], 0
for im in (held + rest if a.train_on_held_out else rest):
    size = os.path.getsize(f"{SRC}/images/{im['file_name']}")
    if a.quality is None and total + size > 26_500_000:
        break
    train.append(im)
    total += size
shutil.rmtree(DST, ignore_errors=True)
# trained on, the 32 would score nothing held out: left behind, which also leaves room in the carry for --calib-originals
for name, sel in [("train", train)] + ([] if a.train_on_held_out else [("dev", held)]):
    os.makedirs(f"{DST}/{name}/images")
    os.makedirs(f"{DST}/{name}/annotations")
    ids = {im["id"] for im in sel}
    sub = dict(j, images=sel, annotations=[a for a in j["annotations"] if a["image_id"] in ids])
    json.dump(sub, open(f"{DST}/{name}/annotations/instances_{name}.json", "w"))
    for im in sel:
        src, dst = f"{SRC}/images/{im['file_name']}", f"{DST}/{name}/images/{im['file_name']}"
        if name == "train" and a.quality:
            from PIL import Image

            Image.open(src).convert("RGB").save(dst, "JPEG", quality=a.quality)
        else:
            shutil.copy(src, dst)
if a.calib_originals:
    from lowbit.data.datasets import load_dataset  # the very draw finetune_gpu.py makes

    os.makedirs(f"{DST}/calib/images")
    for im in load_dataset(f"{DST}/train/images").subset(a.calib_originals).images:
        shutil.copy(f"{SRC}/images/{im.path.name}", f"{DST}/calib/images/{im.path.name}")
os.makedirs(f"{DST}/schemes")
for path in a.manifests:
    m = json.load(open(path))
    m = m.get("manifest", m)
    m["origin"].pop("finetune", None)
    if m["name"] in WANT:
        m["model"] = "lowbit/assets/yolov10n.pt"
        json.dump(m, open(f"{DST}/schemes/{WANT[m['name']]}.json", "w"))
total = sum(os.path.getsize(f"{DST}/train/images/{im['file_name']}") for im in train)
print(f"{len(train)} training images ({total / 1e6:.1f} MB), {0 if a.train_on_held_out else len(held)} held out")
