"""Per-layer latency from a runtime's own profiler, as a table the search can use as the cost of a choice.

OpenVINO's CPU profiler times every executed node; each Conv is mapped back to its PyTorch layer through
its weight input (`<layer>.weight` in a float export, `<layer>.weight_dq` behind lowbit's Q/DQ). The table
holds, per layer, the milliseconds of that conv in each graph given: the float graph under the key
"FP16" (the search's name for "left in float"; it runs f32 on a CPU without BF16) and one Q/DQ graph per
format. Everything that is not a conv is the graph's fixed remainder, measured once from the float graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lowbit.errors import LowbitError

CONV_TYPES = ("Convolution", "GroupConvolution")


def _layer_of_node(path: Path) -> dict[str, str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {n.name: n.input[1].removesuffix("_dq").removesuffix(".weight") for n in model.graph.node
            if n.op_type == "Conv" and len(n.input) > 1}


def openvino_conv_times(path: str | Path, threads: int | None = None, reps: int = 20) -> tuple[dict[str, float], float]:
    """({layer: median ms}, median ms of everything else) for one ONNX graph on OpenVINO CPU."""
    import openvino as ov

    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"{path}: ONNX file not found")
    layer_of = _layer_of_node(path)
    cfg = {"PERF_COUNT": True, "PERFORMANCE_HINT": "LATENCY", **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
    compiled = ov.Core().compile_model(str(path), "CPU", cfg)
    shape = [d.get_length() if d.is_static else 1 for d in compiled.input(0).partial_shape]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    req = compiled.create_infer_request()
    for _ in range(3):
        req.infer({0: x})
    per_layer: dict[str, list[float]] = {}
    rest = []
    for _ in range(reps):
        req.infer({0: x})
        other = 0.0
        seen = {}
        for info in req.get_profiling_info():
            ms = info.real_time.total_seconds() * 1e3
            # OpenVINO names a conv after its ONNX node, with suffixes such as "/WithoutBiases"
            layer = layer_of.get(info.node_name) or layer_of.get(info.node_name.rsplit("/", 1)[0])
            if info.node_type in CONV_TYPES and layer is not None:
                seen[layer] = seen.get(layer, 0.0) + ms
            else:
                other += ms
        for layer, ms in seen.items():
            per_layer.setdefault(layer, []).append(ms)
        rest.append(other)
    return {k: float(np.median(v)) for k, v in per_layer.items()}, float(np.median(rest))


def latency_table(float_onnx: str | Path, quantized: dict[str, str | Path], threads: int | None = None,
                  reps: int = 20) -> dict:
    """{"layers": {layer: {"FP16": ms, fmt: ms, ...}}, "fixed_ms": non-conv time of the float graph}.

    A layer a runtime fused away in some graph (no conv of its own there) costs 0 in that graph."""
    base, fixed = openvino_conv_times(float_onnx, threads, reps)
    table = {layer: {"FP16": ms} for layer, ms in base.items()}
    for fmt, path in quantized.items():
        times, _ = openvino_conv_times(path, threads, reps)
        for layer in table:
            table[layer][fmt] = times.get(layer, 0.0)
    return {"runtime": "openvino-cpu", "threads": threads, "fixed_ms": fixed, "layers": table}
