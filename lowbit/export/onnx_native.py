"""Apply a manifest straight to an existing float ONNX detector (no PyTorch source needed).

Weights are quantized from the graph's own initializers (max per channel / tensor / block); input
ranges come from running the float graph on calibration images with ONNX Runtime (max |x|). The same
Q/DQ writer as the PyTorch path then rewrites the graph, so both paths emit identical operators.
Layers are named as in PyTorch when the ONNX keeps parameter names (`<layer>.weight`), which
torch.onnx and Ultralytics exports do.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.export.onnx_qdq import OPSET, ExportInfo, tensorrt_verdict, write_qdq
from lowbit.formats import Format, parse_format
from lowbit.io import atomic_write_bytes
from lowbit.quantize.manifest import Manifest
from lowbit.quantize.refine import full_range_amax, per_row_integer


def conv_layers(model) -> dict[str, str]:
    """Layer name -> weight initializer name, for every Conv whose weight is an initializer."""
    inits = {i.name for i in model.graph.initializer}
    return {n.input[1].removesuffix(".weight"): n.input[1] for n in model.graph.node
            if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in inits}


def uniform_manifest(model, path: str, fmt: str | Format) -> Manifest:
    fmt = parse_format(fmt)
    layers = {name: fmt for name in conv_layers(model) if not name.endswith(".dfl.conv")}  # DFL decoder stays float
    return Manifest(name=fmt.name, model=path, layers=layers, weight_clip="max", origin={"kind": "onnx-native"})


def _weight_amax(w: np.ndarray, fmt: Format, full_range: bool) -> np.ndarray:
    a = np.abs(w)
    if full_range and per_row_integer(fmt.weight):
        amax = full_range_amax(torch.from_numpy(np.ascontiguousarray(w)), int(fmt.weight.bits),
                               fmt.weight.granularity == "per_channel")
        return amax.numpy().reshape(-1).astype(np.float32)
    if fmt.weight.granularity == "per_channel":
        return a.reshape(a.shape[0], -1).max(1)
    if fmt.weight.granularity == "block":
        b = fmt.weight.block_size
        if w.shape[1] % b:
            raise LowbitError(f"block size {b} does not divide {w.shape[1]} input channels")
        return a.reshape(w.shape[0], w.shape[1] // b, b, *w.shape[2:]).max(2).reshape(-1)
    return a.max().reshape(1)


def _input_ranges(model, tensors: list[str], images: np.ndarray) -> dict[str, float]:
    import onnx
    import onnxruntime as ort

    # A graph input asked back as an output comes out of ONNX Runtime as garbage (seen: 1e16, changing
    # between calls): take its range from the images themselves.
    inputs = {i.name for i in model.graph.input}
    amax = {t: float(np.abs(images).max()) for t in tensors if t in inputs}
    inner = [t for t in tensors if t not in inputs]
    if not inner:
        return amax
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    probe.graph.output.extend([onnx.ValueInfoProto(name=t) for t in inner if t not in existing])
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    amax.update(dict.fromkeys(inner, 0.0))
    for x in images:
        for t, o in zip(inner, sess.run(inner, {name: x[None].astype(np.float32)})):
            amax[t] = max(amax[t], float(np.abs(o).max()))
    return amax


def load_graph(path: str | Path):
    """A float ONNX graph at lowbit's opset (Q/DQ with INT4 and block sizes needs opset 21)."""
    import onnx
    from onnx import version_converter

    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"{path}: ONNX file not found")
    try:
        model = onnx.load(str(path))
    except Exception as e:
        raise LowbitError(f"{path}: not a readable ONNX file ({e})") from None
    if model.opset_import[0].version < OPSET:
        model = version_converter.convert_version(model, OPSET)
    return model


def quantize_onnx(src: str | Path, manifest: Manifest, out: str | Path, calib_images: np.ndarray | None = None) -> ExportInfo:
    """Write a Q/DQ copy of the float ONNX `src` with the formats of `manifest`."""
    import onnx
    from onnx import numpy_helper

    model = load_graph(src)
    weights = conv_layers(model)
    missing = [n for n in manifest.layers if n not in weights]
    if missing:
        raise LowbitError(f"{src}: manifest {manifest.name!r} names layer {missing[0]!r}, which no Conv of this graph "
                          f"reads as '{missing[0]}.weight' ({len(missing)} such layers)")
    inits = {i.name: i for i in model.graph.initializer}
    conv_input = {n.input[1]: n.input[0] for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 1}
    act_layers = [n for n, f in manifest.layers.items() if f.act is not None]
    ranges = {}
    if act_layers:
        if calib_images is None or not len(calib_images):
            raise LowbitError("activation formats need calibration images")
        ranges = _input_ranges(model, sorted({conv_input[weights[n]] for n in act_layers}), calib_images)

    def source(layer: str):
        fmt = manifest.layers[layer]
        w = numpy_helper.to_array(inits[weights[layer]]).astype(np.float32)
        return (w, _weight_amax(w, fmt, manifest.weight_range == "full") if fmt.weight is not None else None,
                ranges.get(conv_input[weights[layer]]) if fmt.act is not None else None)

    counts, n_act = write_qdq(model, manifest, source)
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    ok, why = tensorrt_verdict(manifest)
    atomic_write_bytes(out, data)
    return ExportInfo(path=str(out), layers_quantized=len(manifest.layers), weight_dtypes=counts, activation_qdq=n_act,
                      tensorrt_buildable=ok, tensorrt_reason=why, size_mb=len(data) / 1e6)
