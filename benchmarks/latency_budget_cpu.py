"""A latency-budget scheme from OpenVINO's per-layer table: predicted vs measured (docs/results.md, section 6).

    .venv/bin/python benchmarks/cpu_speed.py                 # writes runs/cpu-speed/yolov10n-{FP32,W8A8}.onnx
    .venv/bin/python benchmarks/latency_budget_cpu.py --sensitivity <a sensitivity method folder with W8A8 scores>

The table is the per-conv time of the float and the W8A8 Q/DQ graph (`lowbit latency-table`); the search
chooses W8A8 or float per layer within a budget (a share of the float graph's conv milliseconds); a prediction is the chosen convs'
times plus the float graph's non-conv time, scaled by the float graph's wall time over its profiled total
(profiling itself adds time); the scheme is then exported and timed. CPU, 2 threads, batch 1, 640x640.
"""

import argparse
import json
from pathlib import Path

from lowbit.api import demo_assets
from lowbit.data.datasets import load_dataset
from lowbit.data.loader import make_batches
from lowbit.evaluate.bench import _time_openvino
from lowbit.evaluate.layer_latency import latency_table
from lowbit.export.onnx_qdq import export_qdq_onnx
from lowbit.models.ultralytics import load_detector
from lowbit.quantize.apply import apply_manifest
from lowbit.search import allocate
from lowbit.sensitivity.report import SensitivityReport


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sensitivity", required=True)
    ap.add_argument("--budgets", default="0.75,0.85,0.95", help="shares of the float graph's conv time")
    ap.add_argument("--work", default="runs/cpu-speed")
    ap.add_argument("--out", default="docs/data/latency-budget-cpu.json")
    a = ap.parse_args()
    work = Path(a.work)
    assets = demo_assets()
    det = load_detector(assets["model"])
    calib = make_batches(load_dataset(assets["calib"]), 640, 8)
    table = latency_table(work / "yolov10n-FP32.onnx", {"W8A8": work / "yolov10n-W8A8.onnx"}, threads=2, reps=20)
    layers, fixed = table["layers"], table["fixed_ms"]
    fp = _time_openvino(work / "yolov10n-FP32.onnx", 2, 5, 30).median_ms
    w8 = _time_openvino(work / "yolov10n-W8A8.onnx", 2, 5, 30).median_ms
    scale = fp / (sum(v["FP16"] for v in layers.values()) + fixed)
    p = allocate.Problem(SensitivityReport.load(a.sensitivity), ["W8A8"], cost="latency", latency_table=layers)
    out = {"fp32_ms": fp, "w8a8_ms": w8, "scale": scale, "fixed_ms": fixed, "schemes": {}}
    print(f"FP32 {fp:.1f} ms, uniform W8A8 {w8:.1f} ms (OpenVINO CPU, 2 threads)")
    float_conv = sum(layers[x.name]["FP16"] for x in p.layers)
    int8_conv = sum(layers[x.name]["W8A8"] for x in p.layers)
    print(f"profiled conv time of the scored layers: float {float_conv:.1f} ms, W8A8 {int8_conv:.1f} ms")
    for b in a.budgets.split(","):
        m = allocate.budget(p, float(b) * float_conv, name=f"latency-{b}-W8A8")
        m.model, m.weight_clip = assets["model"], "max"
        pred = (sum(layers[n]["W8A8"] if n in m.layers else v["FP16"] for n, v in layers.items()) + fixed) * scale
        path = work / f"yolov10n-latency-{b}.onnx"
        export_qdq_onnx(det.net, apply_manifest(det, m, calib).cpu(), m, path)
        r = _time_openvino(path, 2, 5, 30)
        out["schemes"][m.name] = {"int8_layers": len(m.layers), "predicted_damage": m.origin["predicted_damage"],
                                  "predicted_ms": pred, "measured_ms": r.median_ms, "executed": r.executed}
        print(f"{m.name}: {len(m.layers)} INT8 layers, predicted {pred:.1f} ms, measured {r.median_ms:.1f} ms "
              f"({(r.median_ms - pred) / pred * 100:+.1f}%)", flush=True)
    Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
