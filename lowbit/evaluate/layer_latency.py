"""Per-layer latency from a runtime's own profiler, as a table the search can use as the cost of a choice.

OpenVINO's CPU profiler times every executed node; each Conv is mapped back to its PyTorch layer through
its weight input or node name (lowbit.quantize.qdq.layer_of_conv). The table
holds, per layer, the milliseconds of that conv in each graph given: the float graph under the key
"FP16" (the search's name for "left in float"; it runs f32 on a CPU without BF16) and one Q/DQ graph per
format, scaled to wall-clock time per precision (see `latency_table`). Everything that is not a conv is the
graph's fixed remainder, measured once from the float graph.

A per-layer table, profiled on two uniform graphs, cannot see what a mixed scheme pays where neighbouring
convs run in different precisions (a runtime may convert layouts and types there). So the table also holds
the conv-to-conv edges of the graph and a measured price per switch: a probe graph, built from the two
uniform graphs by keeping Q/DQ on every other conv, is profiled, and what it costs beyond its convs' table
times and the fixed remainder is divided by its switches. `predict_ms` and the latency search both count
switches at that price. (OpenVINO on the AVX2 and AMX hosts measured here priced a switch at ~0 ms; the
probe keeps a runtime where switches do cost from being mis-planned.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lowbit.errors import LowbitError

CONV_TYPES = ("Convolution", "GroupConvolution")


def _layer_of_conv(node) -> str:
    from lowbit.quantize.qdq import layer_of_conv

    return layer_of_conv(node)


def _layer_of_node(path: Path) -> dict[str, str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {n.name: _layer_of_conv(n) for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 1}


def conv_edges(path: str | Path) -> list[tuple[str, str]]:
    """(producer layer, consumer layer) for every conv whose input comes from another conv's output through
    ops that are not convs (activations, Q/DQ, split, concat, add, pooling, resize)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}
    edges = set()
    for conv in graph.node:
        if conv.op_type != "Conv" or len(conv.input) < 2:
            continue
        stack, seen = [conv.input[0]], set()
        while stack:
            t = stack.pop()
            n = producer.get(t)
            if n is None or id(n) in seen:
                continue
            seen.add(id(n))
            if n.op_type == "Conv" and len(n.input) > 1:
                edges.add((_layer_of_conv(n), _layer_of_conv(conv)))
            else:
                stack.extend(i for i in n.input if i in producer)
    return sorted(edges)


def mix_qdq_graph(float_onnx: str | Path, qdq_onnx: str | Path, keep: set[str], out: str | Path) -> Path:
    """A graph with the Q/DQ graph's quantized convs only for the layers in `keep`, every other conv as in
    the float graph: mixed schemes for timing, without PyTorch or calibration."""
    import onnx

    from lowbit.io import atomic_write_bytes
    from lowbit.quantize.qdq import conv_layers, drop_unused_initializers

    fl, q = onnx.load(str(float_onnx)), onnx.load(str(qdq_onnx))
    weights = {t.name: t for t in fl.graph.initializer}
    float_weight = {name: ref.weight for name, ref in conv_layers(fl).items()}
    g = q.graph
    producer = {o: n for n in g.node for o in n.output}
    for conv in g.node:
        if conv.op_type != "Conv" or len(conv.input) < 2 or _layer_of_conv(conv) in keep:
            continue
        layer = _layer_of_conv(conv)
        if conv.input[1] != float_weight[layer]:
            g.initializer.append(weights[float_weight[layer]])
            conv.input[1] = float_weight[layer]
        dq = producer.get(conv.input[0])
        if dq is not None and dq.op_type == "DequantizeLinear" and producer.get(dq.input[0]) is not None \
                and producer[dq.input[0]].op_type == "QuantizeLinear":
            conv.input[0] = producer[dq.input[0]].input[0]
    outputs = {o.name for o in g.output}
    while True:  # drop what no longer feeds anything
        used = {i for n in g.node for i in n.input} | outputs
        keep_nodes = [n for n in g.node if any(o in used for o in n.output)]
        if len(keep_nodes) == len(g.node):
            break
        del g.node[:]
        g.node.extend(keep_nodes)
    drop_unused_initializers(g)
    return atomic_write_bytes(out, q.SerializeToString())


def switches(edges: list[tuple[str, str]], low_precision: set[str]) -> int:
    """Edges whose two convs run in different precisions (one in `low_precision`, the other not)."""
    return sum((a in low_precision) != (b in low_precision) for a, b in edges)


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
                  reps: int = 20, probe_switches: bool = True) -> dict:
    """{"layers": {layer: {"FP16": ms, fmt: ms, ...}}, "fixed_ms": non-conv time, "edges": conv-to-conv edges,
    "switch_ms": {fmt: ms per precision switch}, "wall_ms": {precision: wall ms of its uniform graph},
    "profiled": the profiler's own per-layer times, "profiled_fixed_ms"}.

    Times are wall-clock milliseconds: profiling adds time, and not in the same proportion to every graph
    (on the AMX Xeon the INT8 graph's wall time was 1.2x its profiled total when the float graph's was 1.0x),
    so one scale for all precisions mis-predicted mixed schemes by up to 18%. Each precision's profiled conv
    times are scaled so the uniform graphs' sums equal their wall times, measured interleaved right after
    profiling: the float graph sets the scale of the non-conv remainder, and each quantized graph's extra
    non-conv work (its Q/DQ) is charged to its convs. A prediction is then exact for every uniform graph
    and interpolates conv by conv in between. A layer a runtime fused away in some graph (no conv of its
    own there) costs 0 in that graph."""
    import tempfile

    from lowbit.evaluate.bench import compare_openvino

    base, fixed = openvino_conv_times(float_onnx, threads, reps)
    profiled = {layer: {"FP16": ms} for layer, ms in base.items()}
    for fmt, path in quantized.items():
        times, _ = openvino_conv_times(path, threads, reps)
        for layer in profiled:
            profiled[layer][fmt] = times.get(layer, 0.0)
    timed = compare_openvino({"FP16": (float_onnx, None), **{f: (p, None) for f, p in quantized.items()}}, threads,
                             warmup=max(reps // 2, 5), reps=max(reps, 10))
    wall = {f: r.median_ms for f, r in timed.items()}
    if any(w is None for w in wall.values()):
        raise LowbitError(f"{float_onnx}: OpenVINO could not time " + ", ".join(f"{f} ({timed[f].note})" for f, w in wall.items() if w is None))
    conv = {f: sum(v[f] for v in profiled.values()) for f in wall}
    scale = {"FP16": wall["FP16"] / (conv["FP16"] + fixed)}
    fixed_wall = fixed * scale["FP16"]
    for f in quantized:
        # a graph faster than the float graph's remainder alone cannot be split this way: keep the float scale
        scale[f] = (wall[f] - fixed_wall) / conv[f] if conv[f] > 0 and wall[f] > fixed_wall else scale["FP16"]
    table = {layer: {f: ms * scale[f] for f, ms in v.items()} for layer, v in profiled.items()}
    edges = conv_edges(float_onnx)
    out = {"runtime": "openvino-cpu", "threads": threads, "fixed_ms": fixed_wall, "layers": table, "edges": edges,
           "switch_ms": {}, "wall_ms": wall, "scale": scale, "profiled": profiled, "profiled_fixed_ms": fixed}
    if probe_switches:
        order = list(_layer_of_node(Path(float_onnx)).values())  # convs in graph order
        for fmt, path in quantized.items():
            keep = {layer for i, layer in enumerate(order) if i % 2 == 0 and profiled.get(layer, {}).get(fmt)}
            n = switches(edges, keep)
            if not n:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                probe = mix_qdq_graph(float_onnx, path, keep, Path(tmp) / "probe.onnx")
                times, rest = openvino_conv_times(probe, threads, reps)
            expected = sum(profiled[x][fmt if x in keep else "FP16"] for x in profiled) + fixed
            out["switch_ms"][fmt] = max(0.0, (sum(times.values()) + rest - expected) / n) * scale["FP16"]
    return out


def predict_ms(table: dict, assign: dict[str, str]) -> float:
    """Wall-clock latency of a scheme ({layer: format name}; a layer not named stays float), from the table:
    each conv at its format, the fixed remainder, and every precision switch at the probed price."""
    layers = table["layers"]
    ms = sum(v.get(assign.get(layer, "FP16"), v["FP16"]) for layer, v in layers.items()) + table["fixed_ms"]
    for fmt, price in table.get("switch_ms", {}).items():
        ms += price * switches(table.get("edges", []), {layer for layer, f in assign.items() if f == fmt})
    return ms
