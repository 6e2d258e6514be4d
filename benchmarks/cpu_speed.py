"""Deployed speed: FP32 vs Q/DQ ONNX on every runtime present (docs/results.md, section 6): ONNX Runtime and
OpenVINO on this CPU; on the H100, ONNX Runtime CUDA through benchmarks/ort_cuda_gpu.sh.

    .venv/bin/python benchmarks/cpu_speed.py [--manifest runs/.../result.json ...] --out docs/data/cpu-speed.json

YOLOv10n (the carried weights) and YOLOv10m (from yaml) at 640x640, batch 1, 2 threads; uniform W8A8
(per-channel INT8 weights, per-tensor INT8 activations; ModelOpt max calibration on the 16 carried
calibration images; rounding does not change speed) plus any YOLOv10n manifests given. Each runtime
reports which precision the convolutions really ran in, and the output names the CPU and its INT8/BF16
instruction sets. On a many-core machine, export first with all cores, then time pinned to two physical
cores (benchmarks/cpu_speed_device.sh does this on the lent GPU machine's Xeon):

    python benchmarks/cpu_speed.py --export-only
    taskset -c 0,1 python benchmarks/cpu_speed.py
"""

import argparse
import copy
import json
from pathlib import Path

import onnx

from lowbit.api import demo_assets
from lowbit.data.datasets import load_dataset
from lowbit.data.loader import make_batches
from lowbit.evaluate.bench import bench, host_cpu
from lowbit.export.onnx_qdq import export_float_onnx, export_qdq_onnx
from lowbit.models.ultralytics import load_detector
from lowbit.quantize.apply import apply_manifest
from lowbit.quantize.manifest import Manifest


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifest", action="append", default=[], help="a manifest json (or a study result.json) for YOLOv10n")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--work", default="runs/cpu-speed")
    ap.add_argument("--out", default="docs/data/cpu-speed.json")
    ap.add_argument("--export-only", action="store_true", help="write the ONNX graphs, time nothing")
    ap.add_argument("--models", default="yolov10n,yolov10m")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    assets = demo_assets()
    calib = make_batches(load_dataset(assets["calib"]), 640, 8)
    results = {}
    for model in [{"yolov10n": assets["model"], "yolov10m": "yolov10m.yaml"}[t] for t in a.models.split(",")]:
        det = load_detector(model)
        tag = "yolov10n" if model.endswith(".pt") else "yolov10m"
        schemes = {"FP32": None, "W8A8": Manifest.uniform(model, det.layers(), "W8A8", weight_clip="max")}
        if tag == "yolov10n":
            for p in a.manifest:
                data = json.loads(Path(p).read_text())
                m = Manifest.model_validate(data.get("manifest", data))
                m.model, m.weight_clip = model, "max"
                schemes[m.name] = m
        for name, m in schemes.items():
            path = work / f"{tag}-{name.replace('+', '_')}.onnx"
            if not path.is_file():
                if m is None:
                    onnx.save(export_float_onnx(copy.deepcopy(det.net), 640), str(path))
                else:
                    export_qdq_onnx(det.net, apply_manifest(det, m, calib).cpu(), m, path)
            if a.export_only:
                continue
            rows = bench(path, a.threads, reps=a.reps)
            results[f"{tag} {name}"] = [r.model_dump() for r in rows if r.present]
            for r in rows:
                if r.present:
                    timing = f"{r.median_ms:7.1f} ms  p90 {r.p90_ms:7.1f}" if r.median_ms else "      -"
                    print(f"{tag:9s} {name:28s} {r.runtime:18s} {timing}  {r.note}", flush=True)
    if not a.export_only:
        Path(a.out).write_text(json.dumps({"host": host_cpu(), "threads": a.threads, "batch": 1, "imgsz": 640,
                                           "results": results}, indent=1))


if __name__ == "__main__":
    main()
