"""Q/DQ ONNX from a ModelOpt-quantized detector, runnable by ONNX Runtime on the CPU.

Why ours: ModelOpt's torch ONNX export emits INT4 and FP8 through TensorRT-only custom ops, which
ONNX Runtime cannot run. Here the float graph is exported once (opset 21), and each manifest layer's
Conv gets standard operators: weights stored as INT8 / INT4 / FP8 initializers behind a
DequantizeLinear (per-channel axis 0, or blocked along input channels), and its input behind a
QuantizeLinear -> DequantizeLinear pair, with the scales ModelOpt calibrated (amax / qmax).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel

from lowbit.errors import LowbitError
from lowbit.formats import TensorFormat
from lowbit.io import atomic_write_bytes
from lowbit.quantize.manifest import Manifest

OPSET = 21
QMAX = {"int8": 127.0, "int4": 7.0, "fp8": 448.0}


class ExportInfo(BaseModel):
    path: str
    layers_quantized: int
    weight_dtypes: dict[str, int]  # dtype -> count of Conv weights stored in it
    activation_qdq: int
    tensorrt_buildable: bool
    tensorrt_reason: str
    size_mb: float
    parity_max_abs: float | None = None
    parity_mean_abs: float | None = None


def _amax(q) -> np.ndarray:
    a = q.amax
    if a is None:
        raise LowbitError(f"quantizer {q} has no calibrated amax")
    return a.detach().float().cpu().numpy()


def _quantize_weight(w: np.ndarray, tf: TensorFormat, amax: np.ndarray):
    """(stored tensor, scale, axis, block_size) matching ModelOpt's fake quantization."""
    import ml_dtypes

    qmax = QMAX[tf.dtype]
    amax = np.maximum(amax.astype(np.float32), np.finfo(np.float32).tiny)
    if tf.granularity == "block":
        # ModelOpt's amax for blocks of B input channels, one per (out, in-block, kh, kw)
        b = tf.block_size
        cout, cin = w.shape[:2]
        if cin % b:
            raise LowbitError(f"block size {b} does not divide {cin} input channels")
        block_amax = amax.reshape(cout, cin // b, *w.shape[2:])
        amax_full, scale, axis, block = np.repeat(block_amax, b, axis=1), block_amax / qmax, 1, b
    elif tf.granularity == "per_channel":
        amax_full = amax.reshape(-1, *([1] * (w.ndim - 1)))
        scale, axis, block = amax.reshape(-1) / qmax, 0, None
    else:
        amax_full = amax.reshape(())
        scale, axis, block = np.float32(amax_full / qmax), None, None
    # ModelOpt multiplies by qmax/amax rather than dividing by the scale; ties round differently otherwise
    x = w * (np.float32(qmax) / amax_full)
    if tf.dtype == "fp8":
        q = np.clip(x, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    else:
        q = np.clip(np.round(x), -qmax - 1, qmax).astype(ml_dtypes.int4 if tf.dtype == "int4" else np.int8)
    return q, np.asarray(scale, np.float32), axis, block


def _tensor(name: str, value: np.ndarray):
    """An initializer whose values are copied into the proto. numpy_helper.from_array on a 0-d array
    wrote freed memory here (onnx 1.21: scales of 1e24 that changed from run to run)."""
    from onnx import helper, numpy_helper

    value = np.asarray(value)
    if value.ndim == 0:
        return helper.make_tensor(name, helper.np_dtype_to_tensor_dtype(value.dtype), [], [value.item()])
    return numpy_helper.from_array(np.ascontiguousarray(value), name)


def _zero_point(tf: TensorFormat, name: str):
    from onnx import TensorProto, helper

    return helper.make_tensor(name, {"int8": TensorProto.INT8, "fp8": TensorProto.FLOAT8E4M3FN}[tf.dtype], [], [0])


def export_float_onnx(net: torch.nn.Module, imgsz: int) -> "onnx.ModelProto":  # noqa: F821
    import onnx
    from onnx import version_converter

    buf = io.BytesIO()
    net = net.float().eval().cpu()
    with torch.no_grad():
        torch.onnx.export(net, torch.zeros(1, 3, imgsz, imgsz), buf, opset_version=19, dynamo=False,
                          input_names=["images"], output_names=["output0"], do_constant_folding=True)
    return version_converter.convert_version(onnx.load_from_string(buf.getvalue()), OPSET)


def insert_qdq(model, qnet: torch.nn.Module, manifest: Manifest):
    """Rewrite the float graph in place: Q/DQ for every Conv the manifest quantizes, with the weights
    (GPTQ may have changed them) and ranges of the ModelOpt-quantized `qnet`."""
    def source(layer: str):
        mod = qnet.get_submodule(layer)
        act = mod.input_quantizer if manifest.layers[layer].act is not None else None
        return (mod.weight.detach().float().cpu().numpy(), _amax(mod.weight_quantizer) if mod.weight_quantizer.is_enabled else None,
                float(_amax(act).reshape(-1)[0]) if act is not None else None)
    return write_qdq(model, manifest, source)


def write_qdq(model, manifest: Manifest, source):
    """Q/DQ for every Conv the manifest quantizes; `source(layer)` gives (weight, weight amax, input amax)."""
    from onnx import helper

    graph = model.graph
    by_weight = {n.input[1]: n for n in graph.node if n.op_type == "Conv" and len(n.input) > 1}
    counts: dict[str, int] = {}
    n_act = 0
    new_nodes: dict[int, list] = {}
    for layer, fmt in manifest.layers.items():
        conv = by_weight.get(f"{layer}.weight")
        if conv is None:
            raise LowbitError(f"layer {layer}: no Conv in the exported graph reads {layer}.weight")
        w, w_amax, a_amax = source(layer)
        pre = []
        if fmt.weight is not None:
            try:
                q, scale, axis, block = _quantize_weight(w, fmt.weight, w_amax)
            except LowbitError as e:
                raise LowbitError(f"layer {layer}: {e}") from None
            qname, sname = f"{layer}.weight_q", f"{layer}.weight_scale"
            graph.initializer.extend([_tensor(qname, q), _tensor(sname, np.asarray(scale, np.float32))])
            attrs = {} if axis is None else {"axis": axis}
            if block:
                attrs["block_size"] = block
            pre.append(helper.make_node("DequantizeLinear", [qname, sname], [f"{layer}.weight_dq"],
                                        name=f"{layer}/weight_DQ", **attrs))
            conv.input[1] = f"{layer}.weight_dq"
            counts[fmt.weight.dtype] = counts.get(fmt.weight.dtype, 0) + 1
        if fmt.act is not None:
            s = np.float32(max(a_amax / QMAX[fmt.act.dtype], np.finfo(np.float32).tiny))
            sname, zname = f"{layer}.input_scale", f"{layer}.input_zp"
            graph.initializer.extend([_tensor(sname, np.asarray(s, np.float32)), _zero_point(fmt.act, zname)])
            x = conv.input[0]
            pre += [helper.make_node("QuantizeLinear", [x, sname, zname], [f"{layer}.input_q"], name=f"{layer}/input_Q"),
                    helper.make_node("DequantizeLinear", [f"{layer}.input_q", sname, zname], [f"{layer}.input_dq"],
                                     name=f"{layer}/input_DQ")]
            conv.input[0] = f"{layer}.input_dq"
            n_act += 1
        new_nodes[id(conv)] = pre
    # keep topological order: each conv's new Q/DQ nodes go right before it
    nodes = []
    for n in graph.node:
        nodes.extend(new_nodes.get(id(n), []))
        nodes.append(n)
    del graph.node[:]
    graph.node.extend(nodes)
    drop_unused_initializers(graph)
    return counts, n_act


def drop_unused_initializers(graph) -> None:
    used = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def tensorrt_verdict(manifest: Manifest) -> tuple[bool, str]:
    w4 = [n for n, f in manifest.layers.items() if f.weight is not None and f.weight.dtype == "int4"]
    if w4:
        return False, (f"{len(w4)} conv(s) have INT4 weights (e.g. {w4[0]}); TensorRT runs convolutions in "
                       "INT8/FP8/FP16 only (its INT4 is weight-only GEMM)")
    blocks = [n for n, f in manifest.layers.items() if f.weight is not None and f.weight.granularity == "block"]
    if blocks:
        return False, f"{len(blocks)} conv(s) use block-wise weight scales, which TensorRT convolutions do not take"
    fp8 = any(f.weight is not None and f.weight.dtype == "fp8" or f.act is not None and f.act.dtype == "fp8"
              for f in manifest.layers.values())
    return True, "INT8/FP8 Q/DQ convolutions" + (" (FP8 needs Hopper or newer)" if fp8 else "")


def export_qdq_onnx(net_float: torch.nn.Module, qnet: torch.nn.Module, manifest: Manifest, path: str | Path,
                    parity_images: torch.Tensor | None = None) -> ExportInfo:
    """Write a Q/DQ ONNX for `manifest`; with `parity_images`, compare ONNX Runtime with the fake-quant model."""
    import onnx

    model = export_float_onnx(net_float, manifest.imgsz)
    counts, n_act = insert_qdq(model, qnet, manifest)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise LowbitError(f"exported Q/DQ graph for {manifest.name} is invalid: {e}") from None
    data = model.SerializeToString()
    path = atomic_write_bytes(path, data)
    ok, why = tensorrt_verdict(manifest)
    info = ExportInfo(path=str(path), layers_quantized=len(manifest.layers), weight_dtypes=counts, activation_qdq=n_act,
                      tensorrt_buildable=ok, tensorrt_reason=why, size_mb=len(data) / 1e6)
    if parity_images is not None:
        import onnxruntime as ort

        sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        diffs = []
        dev = next(qnet.parameters()).device
        with torch.no_grad():
            for x in parity_images.split(1):
                ref = qnet(x.to(dev))
                ref = (ref[0] if isinstance(ref, (tuple, list)) else ref).float().cpu().numpy()
                out = sess.run(None, {"images": x.numpy()})[0]
                diffs.append(np.abs(out - ref))
        d = np.concatenate([x.reshape(-1) for x in diffs])
        info.parity_max_abs, info.parity_mean_abs = float(d.max()), float(d.mean())
    return info
