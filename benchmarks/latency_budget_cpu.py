"""A latency-budget scheme from OpenVINO's per-layer table: predicted vs measured (docs/results.md, section 6).

    .venv/bin/python benchmarks/cpu_speed.py                 # writes runs/cpu-speed/<model>-{FP32,W8A8}.onnx
    .venv/bin/python benchmarks/latency_budget_cpu.py --sensitivity <a sensitivity report with W8A8 scores>
    .venv/bin/python benchmarks/latency_budget_cpu.py --summarize docs/data/<its output>.json   # errors again

The table is the per-conv time of the float and the W8A8 Q/DQ graph plus the measured price of a precision
switch between neighbouring convs (`lowbit latency-table`); the search chooses W8A8 or float per layer within
a budget: `--budgets` as shares of the float graph's conv time, `--int8-multiples` as multiples of the
uniform W8A8 graph's (1.1: the mixed scheme that keeps the most accuracy while staying within 10% of
uniform INT8's speed). A prediction (`predict_ms`) is the chosen convs' times, the float graph's non-conv
time and the switches, in wall-clock ms: each precision's profiled times are scaled so its uniform graph's
sum is that graph's wall time, measured interleaved when the table is built (until 2026-11-23 one scale,
the float graph's, served every precision); `--no-switches` leaves the switches out, as the first version of the table did. Each scheme is then exported and all graphs are timed interleaved, one inference each in turn
(`compare_openvino`), since a shared machine's speed drifts between minutes. The chosen manifests go into the output,
so their mAP can be measured elsewhere (`lowbit eval`). CPU, 2 threads, batch 1, 640x640; `--model
yolov10m.yaml` for the YOLOv10m structure (then the sensitivity report must be one of that model).
"""

import argparse
import json
from pathlib import Path

from lowbit.api import demo_assets
from lowbit.data.datasets import load_dataset
from lowbit.data.loader import make_batches
from lowbit.errors import LowbitError
from lowbit.evaluate.bench import _openvino_default_precision, compare_openvino, host_cpu
from lowbit.evaluate.layer_latency import latency_table, predict_ms, switches
from lowbit.export.onnx_qdq import export_qdq_onnx
from lowbit.models.ultralytics import load_detector
from lowbit.quantize.apply import apply_manifest
from lowbit.search import allocate
from lowbit.sensitivity.report import SensitivityReport


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sensitivity")
    ap.add_argument("--summarize", help="an output of this script: recompute and print its errors, then exit")
    ap.add_argument("--model", default="yolov10n", help="yolov10n (the carried weights) or yolov10m.yaml")
    ap.add_argument("--budgets", default="0.75,0.85,0.95", help="shares of the float graph's conv time")
    ap.add_argument("--int8-multiples", default="", help="multiples of the uniform W8A8 graph's conv time")
    ap.add_argument("--reps", type=int, default=100, help="interleaved inferences per graph")
    ap.add_argument("--table-reps", type=int, default=20, help="profiled inferences per graph for the table")
    ap.add_argument("--no-switches", action="store_true", help="ignore the price of precision switches")
    ap.add_argument("--work", default="runs/cpu-speed")
    ap.add_argument("--out", default="docs/data/latency-budget-cpu.json")
    a = ap.parse_args()
    if a.summarize:
        out = json.loads(Path(a.summarize).read_text())
        summarize(out)
        Path(a.summarize).write_text(json.dumps(out, indent=1))
        return
    if not a.sensitivity:
        ap.error("--sensitivity is required")
    work = Path(a.work)
    assets = demo_assets()
    model = assets["model"] if a.model == "yolov10n" else a.model
    tag = Path(a.model).stem
    det = load_detector(model)
    calib = make_batches(load_dataset(assets["calib"]), 640, 8)
    fp32, int8 = work / f"{tag}-FP32.onnx", work / f"{tag}-W8A8.onnx"
    table = latency_table(fp32, {"W8A8": int8}, threads=2, reps=a.table_reps, probe_switches=not a.no_switches)
    layers, fixed = table["layers"], table["fixed_ms"]
    p = allocate.Problem(SensitivityReport.load(a.sensitivity), ["W8A8"], cost="latency", latency_table=layers,
                         switch_ms=table["switch_ms"], edges=table["edges"])
    out = {"host": host_cpu(), "model": tag, "float_precision": _openvino_default_precision(),
           "scale": table["scale"], "table_wall_ms": table["wall_ms"], "fixed_ms": fixed, "switch_ms": table["switch_ms"],
           "edges": len(table["edges"]), "schemes": {}}
    float_conv = sum(layers[x.name]["FP16"] for x in p.layers)
    int8_conv = sum(layers[x.name]["W8A8"] for x in p.layers)
    print(f"{tag}: conv time of the scored layers (wall-scaled): float ({out['float_precision']}) {float_conv:.1f} ms, "
          f"W8A8 {int8_conv:.1f} ms; the rest {fixed:.1f} ms; a precision switch {table['switch_ms']} ms, "
          f"{len(table['edges'])} conv-to-conv edges")
    budgets = [(f"latency-{b}-W8A8", float(b) * float_conv) for b in a.budgets.split(",") if b]
    budgets += [(f"latency-int8x{b}-W8A8", float(b) * int8_conv) for b in a.int8_multiples.split(",") if b]
    out["predicted_ms"] = {"FP32": predict_ms(table, {}), "W8A8": predict_ms(table, {n: "W8A8" for n in layers})}
    graphs = {"FP32": (fp32, None), "FP32 (f32)": (fp32, "f32"), "W8A8": (int8, None)}
    for label, ms in budgets:
        try:
            m = allocate.budget(p, ms, name=label)
        except LowbitError as e:
            print(f"{label}: skipped, {e}")
            continue
        m.model, m.weight_clip = model, "max"
        pred = predict_ms(table, {n: "W8A8" for n in m.layers})
        path = work / f"{tag}-{label}.onnx"
        export_qdq_onnx(det.net, apply_manifest(det, m, calib).cpu(), m, path)
        graphs[label] = (path, None)
        n_switch = switches(table["edges"], set(m.layers))
        out["schemes"][label] = {"int8_layers": len(m.layers), "float_layers": len(p.layers) - len(m.layers),
                                 "switches": n_switch,
                                 "predicted_damage": m.origin["predicted_damage"], "predicted_ms": pred,
                                 "manifest": m.model_dump(mode="json")}
    timed = compare_openvino(graphs, threads=2, reps=a.reps)
    out["measured_ms"] = {g: r.median_ms for g, r in timed.items()}
    out["p90_ms"] = {g: r.p90_ms for g, r in timed.items()}
    out["executed"] = {g: r.executed for g, r in timed.items()}
    summarize(out)
    Path(a.out).write_text(json.dumps(out, indent=1))


def summarize(out: dict) -> None:
    """Adds to each scheme its errors and prints them. Absolute: the prediction against the measured median.
    Relative: the predicted speed-up over the float graph (both from the table, built minutes earlier)
    against the measured one (scheme and float graph timed interleaved). On the shared Xeon the float graph's
    wall time moved 40% between building the table and timing (158 -> 112 ms), which no per-layer table
    can foresee; the relative error is what the table itself gets right or wrong."""
    pred_float, meas_float = out["predicted_ms"]["FP32"], out["measured_ms"]["FP32"]
    out["drift"] = meas_float / pred_float
    for g, ms in out["measured_ms"].items():
        line = f"{g:24s} {ms:7.1f} ms  p90 {out['p90_ms'][g]:7.1f}  convs {out['executed'][g]}"
        if g in out["schemes"]:
            s = out["schemes"][g]
            s["measured_ms"] = ms
            s["error_pct"] = (s["predicted_ms"] / ms - 1) * 100
            s["predicted_speedup"] = pred_float / s["predicted_ms"]
            s["measured_speedup"] = meas_float / ms
            s["speedup_error_pct"] = (s["predicted_speedup"] / s["measured_speedup"] - 1) * 100
            line += (f"  {s['int8_layers']} INT8 layers, predicted {s['predicted_ms']:.1f} ms ({s['error_pct']:+.1f}%);"
                     f" speed-up over float predicted {s['predicted_speedup']:.3f}x, measured {s['measured_speedup']:.3f}x"
                     f" ({s['speedup_error_pct']:+.1f}%)")
        print(line, flush=True)


if __name__ == "__main__":
    main()
