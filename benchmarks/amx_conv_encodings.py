"""Why do some INT8 convs run slower than BF16 on an AMX Xeon, and does another encoding of the same INT8 conv
run faster? One conv shape at a time (YOLOv10n's slow ones: dense 3x3 at 64 channels), as a chain of identical
conv+SiLU blocks so the conv dominates, each block's input and weights written in several Q/DQ encodings:

- `float`: no Q/DQ (OpenVINO's default precision: BF16 on AMX)
- `u8-asym`: UINT8 activations with a zero point (what lowbit's openvino-cpu target writes: SiLU outputs reach
  -0.28), INT8 per-channel symmetric weights
- `u8-zp0`: UINT8 with zero point 0 (a ReLU-style range: negatives clip; only to see what the zero point costs)
- `i8-sym`: INT8 symmetric activations (zero point 0)
- `u8-asym-pt`: as u8-asym with one weight scale per tensor
- `u8-asym-nopad`: as u8-asym with the padding outside the conv (an explicit Pad of the zero point's value), so
  the conv itself has no padded border to compensate

Every graph is timed interleaved (`lowbit.evaluate.bench.interleaved`), and OpenVINO's per-node profiler gives
each conv's time and the kernel it ran. With `--model`, the same question on a whole detector: its float export
and its W8A8 graph with activations encoded as UINT8 asymmetric (lowbit's openvino-cpu target) or INT8 symmetric,
quantized where produced or in front of each conv, each checked against ONNX Runtime on real images first (a
graph OpenVINO mis-computes is reported, not timed). Run on the host to characterise (name it in the notes):

    .venv/bin/python benchmarks/amx_conv_encodings.py --threads 2 --out docs/data/amx-conv-encodings.json
    .venv/bin/python benchmarks/amx_conv_encodings.py --model yolov10n.pt --out docs/data/amx-model-encodings.json
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # name: (in channels, out channels, kernel, spatial size, groups)
    "3x3-64-40": (64, 64, 3, 40, 1),
    "3x3-32-80": (32, 32, 3, 80, 1),
    "3x3-128-20": (128, 128, 3, 20, 1),
    "1x1-128-40": (128, 128, 1, 40, 1),
    "dw3x3-128-40": (128, 128, 3, 40, 128),
    "3x3-192-20": (192, 192, 3, 20, 1),
}
ENCODINGS = ("float", "u8-asym", "u8-zp0", "i8-sym", "u8-asym-pt", "u8-asym-nopad")


def _qdq(nodes, inits, x: str, tag: str, scale: float, zp: int, dtype) -> str:
    inits += [numpy_helper.from_array(np.array(scale, np.float32), f"{tag}_s"),
              helper.make_tensor(f"{tag}_z", dtype, [], [zp])]
    nodes += [helper.make_node("QuantizeLinear", [x, f"{tag}_s", f"{tag}_z"], [f"{tag}_q"]),
              helper.make_node("DequantizeLinear", [f"{tag}_q", f"{tag}_s", f"{tag}_z"], [f"{tag}_dq"])]
    return f"{tag}_dq"


def build(shape: tuple, encoding: str, blocks: int = 8, seed: int = 0) -> onnx.ModelProto:
    cin, cout, k, hw, groups = shape
    assert cin == cout
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for b in range(blocks):
        w = (rng.standard_normal((cout, cin // groups, k, k)) / np.sqrt(cin // groups * k * k)).astype(np.float32)
        bias = (0.1 * rng.standard_normal(cout)).astype(np.float32)
        inits.append(numpy_helper.from_array(bias, f"b{b}"))
        pad = k // 2
        if encoding == "float":
            inits.append(numpy_helper.from_array(w, f"w{b}"))
            wname, xin = f"w{b}", x
        else:
            per_tensor = encoding.endswith("-pt")
            amax = np.abs(w).max() if per_tensor else np.abs(w).reshape(cout, -1).max(1)
            ws = (np.maximum(amax, 1e-8) / 127).astype(np.float32)
            wq = np.clip(np.round(w / (ws if per_tensor else ws[:, None, None, None])), -127, 127).astype(np.int8)
            inits += [numpy_helper.from_array(wq, f"w{b}_q"), numpy_helper.from_array(np.asarray(ws), f"w{b}_s"),
                      numpy_helper.from_array(np.zeros_like(np.asarray(ws), np.int8), f"w{b}_z")]
            nodes.append(helper.make_node("DequantizeLinear", [f"w{b}_q", f"w{b}_s", f"w{b}_z"], [f"w{b}_dq"],
                                          **({} if per_tensor else {"axis": 0})))
            wname = f"w{b}_dq"
            lo, hi = -0.28, 6.0  # a SiLU output's range
            if encoding.startswith("u8-asym"):
                s, zp, dt = (hi - lo) / 255, int(round(-lo / ((hi - lo) / 255))), TensorProto.UINT8
            elif encoding == "u8-zp0":
                s, zp, dt = hi / 255, 0, TensorProto.UINT8
            else:
                s, zp, dt = hi / 127, 0, TensorProto.INT8
            xin = _qdq(nodes, inits, x, f"a{b}", s, zp, dt)
            if encoding == "u8-asym-nopad" and pad:
                inits.append(numpy_helper.from_array(np.array([0, 0, pad, pad, 0, 0, pad, pad], np.int64), f"p{b}"))
                nodes.append(helper.make_node("Pad", [f"a{b}_q", f"p{b}", f"a{b}_z"], [f"a{b}_qp"]))
                nodes.append(helper.make_node("DequantizeLinear", [f"a{b}_qp", f"a{b}_s", f"a{b}_z"], [f"a{b}_pdq"]))
                xin, pad = f"a{b}_pdq", 0
        nodes.append(helper.make_node("Conv", [xin, wname, f"b{b}"], [f"c{b}"], kernel_shape=[k, k],
                                      pads=[pad] * 4, group=groups, name=f"conv{b}"))
        nodes.append(helper.make_node("Sigmoid", [f"c{b}"], [f"g{b}"]))
        nodes.append(helper.make_node("Mul", [f"c{b}", f"g{b}"], [f"y{b}"]))
        x = f"y{b}"
    graph = helper.make_graph(nodes, f"{encoding}", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                   [1, cin, hw, hw])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, cout, hw, hw])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def profile_convs(path: Path, threads: int, reps: int = 30) -> dict:
    """Per conv node of the compiled graph: mean ms, its kernel and precision."""
    import openvino as ov

    req = ov.Core().compile_model(str(path), "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
                                                     "PERF_COUNT": True}).create_infer_request()
    x = np.random.default_rng(0).random(list(req.model_inputs[0].shape), dtype=np.float32) * 2
    for _ in range(5):
        req.infer({0: x})
    conv_ms, other_ms, kernels = 0.0, 0.0, collections.Counter()
    for _ in range(reps):
        req.infer({0: x})
        for info in req.get_profiling_info():
            ms = info.real_time.total_seconds() * 1e3 / reps
            if "Convolution" in info.node_type:
                conv_ms += ms
                kernels[info.exec_type] += 1
            else:
                other_ms += ms
    return {"conv_ms": conv_ms, "other_ms": other_ms, "kernels": {k: v // reps for k, v in kernels.items()}}


def whole_model(a, work: Path) -> dict:
    """The detector's float export and W8A8 in four activation encodings, parity-checked, timed interleaved."""
    import torch

    from lowbit.api import demo_assets
    from lowbit.data.datasets import load_dataset
    from lowbit.data.loader import make_batches
    from lowbit.evaluate.bench import bench_models, host_cpu
    from lowbit.export.onnx_qdq import export_float_onnx
    from lowbit.models.ultralytics import load_detector
    from lowbit.quantize.onnx_ptq import quantize_graph, uniform_manifest, write_graph
    from lowbit.quantize.qdq import conv_layers, load_graph

    det = load_detector(a.model, a.imgsz)
    fl = work / "float.onnx"
    onnx.save(export_float_onnx(det.net, a.imgsz), str(fl))
    calib = load_dataset(a.calib or demo_assets()["calib"]).subset(a.calib_images, 0)
    images = torch.cat([b.images for b in make_batches(calib, a.imgsz, 8)]).numpy()
    paths = [fl]
    for dtype, placement in (("uint8", "producer"), ("int8", "producer"), ("uint8", "consumer"), ("int8", "consumer")):
        model = load_graph(fl)
        layers = conv_layers(model)
        manifest = uniform_manifest(model, str(fl), "W8A8")
        done = quantize_graph(model, manifest, images, dtype, None, layers=layers, placement=placement)
        path = work / f"w8a8-{dtype}-{placement}.onnx"
        write_graph(model, path, done.pop("manifest"), layers, "onnxruntime-cpu", path.stem)
        paths.append(path)
    verify = make_batches(load_dataset(demo_assets()["calib"]).subset(8, 0), a.imgsz, 1)
    rows = bench_models(paths, a.threads, reps=a.reps, verify=verify, throughput_rounds=a.throughput_rounds)
    out = {"host": host_cpu(a.threads), "model": a.model, "imgsz": a.imgsz, "rows": []}
    for r in rows:
        if r.runtime.startswith("openvino"):
            out["rows"].append(r.model_dump(mode="json"))
            print(f"{Path(r.model).stem:24s} {r.runtime:16s} "
                  + ("FAILS parity" if r.failed else f"{r.median_ms or 0:6.2f} ms  x{r.speedup or 0:.2f}  "
                     f"img/s {r.throughput_ips or 0:6.1f} x{r.throughput_speedup or 0:.2f}") + f"  {r.note[:90]}",
                  flush=True)
    return out


def main():
    from lowbit.evaluate.bench import host_cpu, interleaved
    from lowbit.evaluate.runners import OpenVinoRunner

    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--model", default=None, help="a detector (.pt or .yaml): whole-model encodings instead")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--calib", default=None, help="calibration images (default: the ones lowbit carries)")
    ap.add_argument("--calib-images", type=int, default=16)
    ap.add_argument("--throughput-rounds", type=int, default=8)
    ap.add_argument("--work", default="runs/amx-conv-encodings")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if a.model:
        Path(a.out).write_text(json.dumps(whole_model(a, work), indent=1))
        return
    out = {"host": host_cpu(a.threads), "blocks": 8, "shapes": {}}
    for name in a.shapes.split(","):
        paths = {}
        for enc in ENCODINGS:
            paths[enc] = work / f"{name}-{enc}.onnx"
            onnx.save(build(SHAPES[name], enc), str(paths[enc]))
        runners = {enc: OpenVinoRunner(p, None, a.threads) for enc, p in paths.items()}
        times = interleaved({enc: ((lambda v, r=r: r.run_raw(v)), r.random_input() * 2) for enc, r in runners.items()},
                            warmup=5, reps=a.reps)
        med = {enc: float(np.median(t)) for enc, t in times.items()}
        row = {}
        for enc in ENCODINGS:
            prof = profile_convs(paths[enc], a.threads)
            row[enc] = {"median_ms": med[enc], "speedup_vs_float": med["float"] / med[enc], **prof}
        out["shapes"][name] = row
        print(f"{name}: " + ", ".join(f"{enc} {r['median_ms']:.2f} ms ({r['speedup_vs_float']:.2f}x; convs "
                                      f"{r['conv_ms']:.2f} ms {'/'.join(r['kernels'])})" for enc, r in row.items()),
              flush=True)
        Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
