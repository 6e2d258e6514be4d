"""A detector ONNX from another framework: lowbit's evaluation against the framework's own pre- and post-processing.

    git clone https://github.com/Megvii-BaseDetection/YOLOX /path/to/YOLOX   # its code is read, not installed
    .venv/bin/python benchmarks/onnx_detector_reference.py yolox_nano.onnx --yolox-src /path/to/YOLOX \
        --data ../shared/assets/coco-val200/coco-val200.yaml --out docs/data/yolox-nano-reference.json
    .venv/bin/python benchmarks/onnx_detector_reference.py picodet_s_320_coco.onnx --family picodet \
        --data ../shared/assets/coco-val200/coco-val200.yaml --out docs/data/picodet-s-320-reference.json

PP-PicoDet (PaddleDetection's legacy picodet_s_320_coco.onnx, its deploy export: per level a sigmoid score map and
a box-distribution map, reg_max 7, strides 8-64): PaddleDetection cannot run here (no paddle wheel), so its eval
pipeline is written out below from its source, step for step: the EvalReader (decode to RGB, `Resize` with
keep_ratio False and interp 2 = cubic via fx/fy, `NormalizeImage` with ImageNet statistics), the GFL head's
post-processing (softmax expectation of the 8 bins times the stride, cell centres at +0.5, boxes divided by
scale_factor, no clipping) and `MultiClassNMS` (score > 0.025, 1000 per class, IoU 0.6, 100 per image). lowbit's
figure is `lowbit eval` with a model card `{preprocess: paddle, decoder: gfl}`.

The reference is YOLOX's `preproc` (BGR, 0-255, resized into the top-left corner, padded with 114) and the
`postprocess` its COCO evaluator calls (confidence 0.01, class-aware NMS at 0.65), with boxes divided by the resize
ratio as its evaluator does; both score with pycocotools through lowbit's `coco_map`. lowbit's figure is `lowbit
eval --preprocess yolox` (decoder detected from the output shape). The YOLOX-nano ONNX used for docs/results.md
is the official release's, as committed to Kazuhito00/YOLOX-ONNX-TFLite-Sample (model/yolox_nano.onnx, Apache-2.0).
"""

import argparse
import importlib.util
import sys
from pathlib import Path

import cv2
import onnxruntime as ort
import torch

from lowbit.api import run_eval
from lowbit.config import DataConfig, EvalConfig
from lowbit.data.datasets import load_dataset
from lowbit.evaluate.coco import coco_map
from lowbit.io import write_json


def _load(src: Path, rel: str, name: str):
    spec = importlib.util.spec_from_file_location(name, src / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def picodet_reference_map(model: Path, data: str) -> float:
    import numpy as np
    from torchvision.ops import batched_nms

    ds = load_dataset(data)
    cats = sorted(ds.coco["categories"], key=lambda c: c["id"])
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    th, tw = sess.get_inputs()[0].shape[-2:]
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    dets = []
    for rec in ds.images:
        img = cv2.cvtColor(cv2.imread(str(rec.path)), cv2.COLOR_BGR2RGB)
        h, w = img.shape[:2]
        sy, sx = th / h, tw / w
        x = cv2.resize(img, None, None, fx=sx, fy=sy, interpolation=cv2.INTER_CUBIC).astype(np.float32) / 255.0
        x = ((x - mean) / std).astype(np.float32).transpose(2, 0, 1)[None]
        outs = sess.run(None, {sess.get_inputs()[0].name: x})
        levels = len(outs) // 2
        boxes, scores = [], []
        for i, (cls, reg) in enumerate(zip(outs[:levels], outs[levels:])):
            stride = 8 * 2 ** i
            fh, fw = -(-th // stride), -(-tw // stride)
            cy, cx = np.meshgrid((np.arange(fh) + 0.5) * stride, (np.arange(fw) + 0.5) * stride, indexing="ij")
            bins = reg.shape[-1] // 4
            p = np.exp(reg[0].reshape(-1, 4, bins) - reg[0].reshape(-1, 4, bins).max(-1, keepdims=True))
            d = (p / p.sum(-1, keepdims=True)) @ np.arange(bins) * stride
            cx, cy = cx.reshape(-1), cy.reshape(-1)
            boxes.append(np.stack([cx - d[:, 0], cy - d[:, 1], cx + d[:, 2], cy + d[:, 3]], 1))
            scores.append(cls[0])
        b = torch.from_numpy(np.concatenate(boxes) / np.array([sx, sy, sx, sy])).float()
        sc = torch.from_numpy(np.concatenate(scores))
        keep_b, keep_c, keep_s = [], [], []
        for c in range(sc.shape[1]):
            idx = torch.nonzero(sc[:, c] > 0.025).flatten()
            idx = idx[sc[idx, c].argsort(descending=True)[:1000]]
            keep_b.append(b[idx])
            keep_s.append(sc[idx, c])
            keep_c.append(torch.full((len(idx),), c))
        bb, ss, cc = torch.cat(keep_b), torch.cat(keep_s), torch.cat(keep_c)
        keep = batched_nms(bb, ss, cc, 0.6)[:100]
        for (x1, y1, x2, y2), s, c in zip(bb[keep].tolist(), ss[keep].tolist(), cc[keep].tolist()):
            dets.append({"image_id": rec.image_id, "category_id": cats[int(c)]["id"],
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s})
    return coco_map(ds.coco, dets)["map50_95"]


def reference_map(model: Path, data: str, yolox_src: Path) -> float:
    # the two functions, loaded from their files (the package's __init__ imports its training stack)
    boxes = _load(yolox_src, "yolox/utils/boxes.py", "yolox_boxes")
    sys.modules.setdefault("yolox", type(sys)("yolox"))
    sys.modules.setdefault("yolox.utils", boxes)  # what data_augment imports from the package (xyxy2cxcywh)
    augment = _load(yolox_src, "yolox/data/data_augment.py", "yolox_augment")
    ds = load_dataset(data)
    cats = sorted(ds.coco["categories"], key=lambda c: c["id"])
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    size = sess.get_inputs()[0].shape[-2:]
    dets = []
    for rec in ds.images:
        img = cv2.imread(str(rec.path))
        x, r = augment.preproc(img, size)
        out = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x[None]})[0])
        grids, strides = [], []
        for s in (8, 16, 32):  # decode_outputs of YOLOXHead, which the export leaves out of the graph
            h, w = size[0] // s, size[1] // s
            yv, xv = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            grids.append(torch.stack((xv, yv), 2).view(1, -1, 2))
            strides.append(torch.full((1, h * w, 1), s))
        grid, stride = torch.cat(grids, 1).float(), torch.cat(strides, 1).float()
        out = torch.cat([(out[..., :2] + grid) * stride, out[..., 2:4].exp() * stride, out[..., 4:]], -1)
        pred = boxes.postprocess(out, len(cats), 0.01, 0.65)[0]
        if pred is None:
            continue
        b = pred[:, :4].numpy() / r
        for (x1, y1, x2, y2), obj, cls, c in zip(b, pred[:, 4].tolist(), pred[:, 5].tolist(), pred[:, 6].tolist()):
            dets.append({"image_id": rec.image_id, "category_id": cats[int(c)]["id"],
                         "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)], "score": obj * cls})
    return coco_map(ds.coco, dets)["map50_95"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--family", choices=["yolox", "picodet"], default="yolox")
    ap.add_argument("--yolox-src", type=Path, help="a YOLOX checkout (--family yolox)")
    ap.add_argument("--data", action="append", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    out = {"model": a.model, "family": a.family, "results": {}}
    for data in a.data:
        if a.family == "yolox":
            ref = reference_map(Path(a.model), data, a.yolox_src)
            cfg = EvalConfig(model=a.model, data=DataConfig(path=data), preprocess="yolox", batch=8)
        else:
            ref = picodet_reference_map(Path(a.model), data)
            cfg = EvalConfig(model=a.model, data=DataConfig(path=data), preprocess="paddle", decoder="gfl")
        res = run_eval(cfg, Path(a.out).with_suffix("") / Path(data).stem, progress=False)
        out["results"][data] = {"reference": ref, "lowbit": res.map50_95, "difference": res.map50_95 - ref}
        print(f"{data}: {a.family}'s own pipeline {ref:.4f}, lowbit eval {res.map50_95:.4f} ({res.map50_95 - ref:+.4f})")
        write_json(a.out, out)


if __name__ == "__main__":
    main()
