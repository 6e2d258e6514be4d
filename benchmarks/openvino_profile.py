"""Where an ONNX graph's time goes on OpenVINO's CPU plugin: wall time and the profiler's time per executed
node type (kernel included), so a Q/DQ graph's overhead outside the convolutions shows (docs/results.md,
section 6). Needs only openvino and numpy, so it runs on a bare machine with the carried OpenVINO.

    python benchmarks/openvino_profile.py A.onnx B.onnx ... [--precision f32] [--threads 2] --out P.json
"""

import argparse
import collections
import json
import time
from pathlib import Path

import numpy as np
import openvino as ov


def profile(path: str, threads: int, precision: str | None, reps: int) -> dict:
    cfg = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
           **({"INFERENCE_PRECISION_HINT": precision} if precision else {})}
    core = ov.Core()
    x = np.random.default_rng(0).random([1, 3, 640, 640], dtype=np.float32)
    req = core.compile_model(path, "CPU", cfg).create_infer_request()
    for _ in range(5):
        req.infer({0: x})
    wall = []
    for _ in range(reps):  # wall time without the profiler, which adds its own
        t = time.perf_counter()
        req.infer({0: x})
        wall.append((time.perf_counter() - t) * 1e3)
    req = core.compile_model(path, "CPU", {**cfg, "PERF_COUNT": True}).create_infer_request()
    for _ in range(3):
        req.infer({0: x})
    by_kind: dict[str, float] = collections.defaultdict(float)
    by_node: dict[str, float] = collections.defaultdict(float)
    n = 10
    for _ in range(n):
        req.infer({0: x})
        for info in req.get_profiling_info():
            ms = info.real_time.total_seconds() * 1e3 / n
            by_kind[f"{info.node_type} [{info.exec_type}]"] += ms
            if "Convolution" not in info.node_type:
                by_node[f"{info.node_type} {info.node_name}"] += ms
    conv = sum(v for k, v in by_kind.items() if "Convolution" in k)
    return {"median_ms": float(np.median(wall)), "profiled_ms": sum(by_kind.values()), "conv_ms": conv,
            "by_kind": dict(sorted(by_kind.items(), key=lambda t: -t[1])),
            "top_other_nodes": dict(sorted(by_node.items(), key=lambda t: -t[1])[:15])}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", action="append", default=[], help="float precision hint(s) beside the default")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    out = {}
    for m in a.models:
        for prec in [None, *a.precision]:
            key = f"{Path(m).name} [{prec or 'default'}]"
            r = out[key] = profile(m, a.threads, prec, a.reps)
            print(f"{key}: {r['median_ms']:.1f} ms wall; profiled {r['profiled_ms']:.1f} ms, convs {r['conv_ms']:.1f}, "
                  f"other {r['profiled_ms'] - r['conv_ms']:.1f}", flush=True)
            for k, v in list(r["by_kind"].items())[:8]:
                print(f"    {v:6.2f} ms  {k}")
    Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
