"""lowbit's Q/DQ ONNX against ModelOpt's ONNX PTQ for the same model (docs/results.md, section 6).

    bash benchmarks/modelopt_onnx_env.sh            # ModelOpt's ONNX extras beside the pinned stack
    PYTHONPATH=/tmp/moonnx .venv/bin/python benchmarks/qdq_vs_modelopt.py --out docs/data/qdq-vs-modelopt.json

YOLOv10n, uniform INT8 (W8A8), both from lowbit's float export and the same 32 coco-calib-train images with
max calibration: lowbit's export (ModelOpt PyTorch quantization, lowbit's Q/DQ writer) and
`modelopt.onnx.quantization.quantize(quantize_mode="int8")` (float ops kept FP32 for the CPU). For each:
the Q/DQ placement rules (`lowbit check-qdq`), latency on every runtime present with the precision
OpenVINO really ran the convs in (2 threads, batch 1), and mAP50-95 under ONNX Runtime on coco-val200.
"""

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import onnx

from lowbit.data.datasets import load_dataset
from lowbit.data.loader import make_batches
from lowbit.evaluate.bench import bench
from lowbit.evaluate.coco import evaluate
from lowbit.export.onnx_qdq import export_float_onnx, export_qdq_onnx
from lowbit.export.qdq_lint import check_qdq
from lowbit.models.ultralytics import load_detector
from lowbit.quantize.apply import apply_manifest
from lowbit.quantize.manifest import Manifest

SHARED = Path("../shared/assets")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="runs/qdq-vs-modelopt")
    ap.add_argument("--out", default="docs/data/qdq-vs-modelopt.json")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    from modelopt.onnx.quantization import quantize  # needs benchmarks/modelopt_onnx_env.sh

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    det = load_detector("lowbit/assets/yolov10n.pt")
    calib = load_dataset(SHARED / "coco-calib-train/coco-calib-train.yaml").subset(32)
    batches = make_batches(calib, 640, 8)
    val = load_dataset(SHARED / "coco-val200/coco-val200.yaml")

    paths = {"float": work / "float.onnx", "lowbit": work / "lowbit-W8A8.onnx", "modelopt-onnx": work / "modelopt-int8.onnx"}
    onnx.save(export_float_onnx(copy.deepcopy(det.net), 640), str(paths["float"]))
    m = Manifest.uniform(det.source, det.layers(), "W8A8", weight_clip="max")
    export_qdq_onnx(det.net, apply_manifest(det, m, batches).cpu(), m, paths["lowbit"])
    images = np.concatenate([b.images.numpy() for b in batches]).astype(np.float32)
    quantize(onnx_path=str(paths["float"]), quantize_mode="int8", calibration_data={"images": images},
             calibration_method="max", calibration_eps=["cpu"], high_precision_dtype="fp32",
             output_path=str(paths["modelopt-onnx"]))

    out = {"model": "YOLOv10n", "calibration": "32 coco-calib-train images, max", "threads": a.threads, "results": {}}
    for name, path in paths.items():
        rep = check_qdq(path)
        speed = [r.model_dump() for r in bench(path, a.threads, reps=30) if r.present]
        res = evaluate(str(path), val, det.names, 640, 1, progress=False, model_name=name)
        out["results"][name] = {"qdq": rep.model_dump(), "violations": rep.violations(), "bench": speed,
                                "map50_95": res.map50_95, "size_mb": path.stat().st_size / 1e6}
        print(f"{name:14s} mAP50-95 {res.map50_95:.4f}  " + "  ".join(
            f"{r['runtime']} {r['median_ms']:.1f} ms" for r in speed if r["median_ms"]), flush=True)
        print(f"{'':14s} weights {rep.weight_dtypes}, act Q/DQ {rep.activation_qdq} -> {rep.activation_consumers}", flush=True)
        for v in rep.violations() or ["Q/DQ placement: no rule broken"]:
            print(f"{'':14s} {v}", flush=True)
        for r in speed:
            if r.get("executed"):
                print(f"{'':14s} {r['runtime']}: {r['note']}", flush=True)
    Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
