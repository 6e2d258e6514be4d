"""ONNX graphs at the Q/DQ level: find each Conv's layer and weight by graph structure, and write standard
QuantizeLinear / DequantizeLinear operators for a manifest.

Why ours: ModelOpt's torch ONNX export emits INT4 and FP8 through TensorRT-only custom ops, which ONNX Runtime and
OpenVINO cannot run, and ONNX Runtime's quantizer knows neither lowbit's manifests nor INT4 convs. Both lowbit
paths (a PyTorch checkpoint exported, a float ONNX quantized in place) write through `write_qdq`, so they emit the
same operators: weights stored as INT8 / INT4 / FP8 initializers behind a DequantizeLinear (per-channel axis 0, or
blocked along input channels), and each quantized conv's input behind a QuantizeLinear -> DequantizeLinear pair.

Layer names: a Conv whose weight initializer is `<name>.weight` (torch.onnx and Ultralytics keep parameter names)
is layer `<name>`, the PyTorch module; a Conv of a graph whose weights were renamed (batch-norm folding names them
`onnx::Conv_N`) is named by its node (`/model.2/cv2/conv/Conv` -> `model.2.cv2.conv`, as torch.onnx names nodes
after modules), else by the node's own name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lowbit.errors import LowbitError
from lowbit.formats import Format, TensorFormat

OPSET = 21
QMAX = {"int8": 127.0, "int4": 7.0, "fp8": 448.0}


@dataclass
class ConvRef:
    """One Conv of a graph: its node, the tensor that holds its float weight, and its input tensor."""

    node: object  # onnx NodeProto
    weight: str  # name of the initializer (or Constant output) read as the weight
    input: str


def layer_of_conv(node) -> str:
    w = node.input[1] if len(node.input) > 1 else ""
    for suffix in (".weight_dq", ".weight"):
        if w.endswith(suffix):
            return w.removesuffix(suffix)
    name = node.name or ""
    if name.startswith("/") and name.count("/") > 1:  # torch.onnx: /module/path/Conv
        return ".".join(name.strip("/").split("/")[:-1])
    return name or w


def load_graph(path: str | Path):
    """A float ONNX graph at lowbit's opset (Q/DQ with INT4 and block sizes needs opset 21)."""
    import onnx
    from onnx import version_converter

    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"{path}: ONNX file not found")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as e:
        raise LowbitError(f"{path}: not a readable ONNX file ({str(e).splitlines()[0][:200]})") from None
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if version < OPSET:
        try:
            model = version_converter.convert_version(model, OPSET)
        except Exception as e:
            raise LowbitError(f"{path}: cannot convert from opset {version} to {OPSET} ({e})") from None
    # Older exporters (paddle2onnx among them) also list every weight as a graph input; from ONNX IR 4 on, such an
    # input is one a caller may override, and OpenVINO then asks for each of them. They are constants here.
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) < len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(inputs)
    return model


def constant_tensors(model) -> dict[str, object]:
    """Name -> TensorProto of every initializer and Constant node output."""
    out = {i.name: i for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            out[n.output[0]] = n.attribute[0].t
    return out


def conv_layers(model) -> dict[str, ConvRef]:
    """Layer name -> Conv, for every Conv whose weight is a float constant (an initializer or a Constant node,
    whatever its name). Convs whose weights are graph inputs or already quantized are not layers to quantize."""
    consts = constant_tensors(model)
    out: dict[str, ConvRef] = {}
    for n in model.graph.node:
        if n.op_type != "Conv" or len(n.input) < 2 or n.input[1] not in consts:
            continue
        if consts[n.input[1]].data_type not in (1, 10, 11, 16):  # float, float16, double, bfloat16
            continue
        name = layer_of_conv(n)
        if name in out:
            name = f"{name}#{sum(1 for k in out if k.split('#')[0] == name)}"
        out[name] = ConvRef(node=n, weight=n.input[1], input=n.input[0])
    return out


# Ops through which a conv still reads the image itself (8-bit values, at most affinely rescaled): layout, casts,
# Q/DQ, per-channel normalisation, padding, and the slices a space-to-depth stem (YOLOX's Focus) concatenates.
_IMAGE_PASS = {"QuantizeLinear", "DequantizeLinear", "Cast", "Transpose", "Identity", "Div", "Mul", "Sub", "Add", "Pad",
               "Slice", "Concat"}


def image_convs(model, layers: dict[str, ConvRef] | None = None) -> set[str]:
    """Layers whose Conv reads the graph's input (lowbit.formats.for_image_input)."""
    layers = conv_layers(model) if layers is None else layers
    inputs = {i.name for i in model.graph.input}
    producer = {o: n for n in model.graph.node for o in n.output}

    def from_image(t: str) -> bool:
        for _ in range(16):
            if t in inputs:
                return True
            n = producer.get(t)
            if n is None or n.op_type not in _IMAGE_PASS or not n.input:
                return False
            t = n.input[0]
        return False

    return {name for name, ref in layers.items() if from_image(ref.input)}


def conv_weights(model, layers: dict[str, ConvRef] | None = None) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    consts = constant_tensors(model)
    layers = conv_layers(model) if layers is None else layers
    return {name: numpy_helper.to_array(consts[ref.weight]).astype(np.float32) for name, ref in layers.items()}


def quantize_weight(w: np.ndarray, tf: TensorFormat, amax: np.ndarray):
    """(stored tensor, scale, axis, block_size), rounding exactly as ModelOpt's fake quantization does."""
    import ml_dtypes

    qmax = QMAX[tf.dtype]
    amax = np.maximum(np.asarray(amax, np.float32), np.finfo(np.float32).tiny)
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


@dataclass
class ActQuant:
    """How one conv input is quantized: symmetric INT8 / FP8 (zero point 0) or asymmetric UINT8."""

    scale: float
    zero_point: int = 0
    dtype: str = "int8"  # int8, uint8 or fp8

    @classmethod
    def symmetric(cls, amax: float, dtype: str = "int8") -> "ActQuant":
        return cls(scale=float(max(np.float32(amax / QMAX[dtype]), np.finfo(np.float32).tiny)), dtype=dtype)

    @classmethod
    def asymmetric(cls, lo: float, hi: float) -> "ActQuant":
        """UINT8 over [lo, hi], widened to hold 0 exactly (zero padding and ReLU-like zeros stay exact)."""
        lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
        scale = max((hi - lo) / 255.0, float(np.finfo(np.float32).tiny))
        return cls(scale=float(np.float32(scale)), zero_point=int(np.clip(round(-lo / scale), 0, 255)), dtype="uint8")

    def fake(self, x: np.ndarray) -> np.ndarray:
        """What the Q/DQ pair computes, in numpy (integer types)."""
        lo, hi = (0, 255) if self.dtype == "uint8" else (-128, 127)
        s = np.float32(self.scale)
        return ((np.clip(np.round(x / s) + self.zero_point, lo, hi) - self.zero_point) * s).astype(np.float32)


def _tensor(name: str, value: np.ndarray):
    """An initializer whose values are copied into the proto. numpy_helper.from_array on a 0-d array
    wrote freed memory here (onnx 1.21: scales of 1e24 that changed from run to run)."""
    from onnx import helper, numpy_helper

    value = np.asarray(value)
    if value.ndim == 0:
        return helper.make_tensor(name, helper.np_dtype_to_tensor_dtype(value.dtype), [], [value.item()])
    return numpy_helper.from_array(np.ascontiguousarray(value), name)


def _zero_point(act: ActQuant, name: str):
    from onnx import TensorProto, helper

    kind = {"int8": TensorProto.INT8, "uint8": TensorProto.UINT8, "fp8": TensorProto.FLOAT8E4M3FN}[act.dtype]
    return helper.make_tensor(name, kind, [], [act.zero_point])


def write_qdq(model, manifest, source, layers: dict[str, ConvRef] | None = None,
              activations: bool = True) -> tuple[dict[str, int], int]:
    """Q/DQ for every Conv the manifest quantizes, in place. `source(layer)` gives (float weight, weight amax,
    ActQuant or None) and may return a new bias for the layer as a fourth item. With `activations` False the
    convs' inputs are left alone (quantized on their producers' side: `insert_activation_qdq`). Returns (weight
    dtype counts, activation Q/DQ pairs)."""
    from onnx import helper

    graph = model.graph
    layers = conv_layers(model) if layers is None else layers
    counts: dict[str, int] = {}
    n_act = 0
    new_nodes: dict[int, list] = {}
    for layer, fmt in manifest.layers.items():
        ref = layers.get(layer)
        if ref is None:
            raise LowbitError(f"layer {layer}: no Conv of this graph is that layer (its Convs: "
                              f"{', '.join(list(layers)[:3])}...; see `lowbit layers -m MODEL.onnx`)")
        conv = ref.node
        got = source(layer)
        w, w_amax, act = got[:3]
        bias = got[3] if len(got) > 3 else None
        pre = []
        if fmt.weight is not None:
            try:
                q, scale, axis, block = quantize_weight(w, fmt.weight, w_amax)
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
        if fmt.act is not None and activations:
            if act is None:
                raise LowbitError(f"layer {layer}: its input has no calibrated range")
            sname, zname = f"{layer}.input_scale", f"{layer}.input_zp"
            graph.initializer.extend([_tensor(sname, np.asarray(act.scale, np.float32)), _zero_point(act, zname)])
            x = conv.input[0]
            pre += [helper.make_node("QuantizeLinear", [x, sname, zname], [f"{layer}.input_q"],
                                     name=quantize_node_name(layer=layer)),
                    helper.make_node("DequantizeLinear", [f"{layer}.input_q", sname, zname], [f"{layer}.input_dq"],
                                     name=f"{layer}/input_DQ")]
            conv.input[0] = f"{layer}.input_dq"
            n_act += 1
        if bias is not None:
            bname = f"{layer}.bias_corrected"
            graph.initializer.append(_tensor(bname, np.asarray(bias, np.float32)))
            if len(conv.input) > 2:
                conv.input[2] = bname
            else:
                conv.input.append(bname)
        new_nodes[id(conv)] = pre
    # keep topological order: each conv's new Q/DQ nodes go right before it
    nodes = []
    for n in graph.node:
        nodes.extend(new_nodes.get(id(n), []))
        nodes.append(n)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # shapes and types inferred before the rewrite may no longer hold
    drop_unused_initializers(graph)
    return counts, n_act


def drop_unused_initializers(graph) -> None:
    used = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def uniform_layers(model, fmt: Format) -> dict[str, Format]:
    """Every Conv of the graph at `fmt`, except a DFL decoder (a fixed 0..reg_max-1 conv that must stay float)."""
    weights = conv_weights(model)
    return {name: fmt for name, w in weights.items() if not is_dfl(name, w)}


def is_dfl(name: str, w: np.ndarray) -> bool:
    # Ultralytics' DFL conv: one output channel whose fixed weights are 0..reg_max-1
    return name.endswith(".dfl.conv") or (w.ndim == 4 and w.shape[0] == 1 and w.shape[2:] == (1, 1) and w.shape[1] > 1
                                          and np.allclose(w.reshape(-1), np.arange(w.shape[1])))


# Ops that move or select values without computing new ones: a quantized tensor stays quantized through them, so
# OpenVINO runs them (and the Concat a C2f block ends in) on INT8 data.
DATA_MOVEMENT = {"Concat", "Split", "Slice", "MaxPool", "Resize", "Reshape", "Transpose", "Flatten", "Squeeze",
                 "Unsqueeze", "Identity"}


def activation_groups(model, layers: dict[str, ConvRef], quantized: list[str]) -> list[tuple[list[str], list[str]]]:
    """Where to quantize the inputs of the `quantized` convs on their producers' side: (source tensors, layers
    served) per group. A conv's input is traced back through data-movement ops to the tensors computed before
    them (an activation's output, a residual Add, the image); tensors that meet in one conv's input share one
    quantizer, so a Concat of them stays INT8."""
    producer = {o: n for n in model.graph.node for o in n.output}
    parent: dict[str, str] = {}

    def find(t: str) -> str:
        while parent[t] != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    def sources(t: str, seen: set) -> list[str]:
        if t in seen:
            return []
        seen.add(t)
        n = producer.get(t)
        if n is None or n.op_type not in DATA_MOVEMENT:
            return [t]
        data = n.input if n.op_type == "Concat" else n.input[:1]
        return [s for i in data if i for s in sources(i, seen)]

    served: dict[str, list[str]] = {}
    for layer in quantized:
        src = sources(layers[layer].input, set())
        for s in src:
            parent.setdefault(s, s)
        for s in src[1:]:
            parent[find(s)] = find(src[0])
        served.setdefault(src[0], []).append(layer)
    groups: dict[str, tuple[list[str], list[str]]] = {}
    for s in parent:
        groups.setdefault(find(s), ([], []))[0].append(s)
    for s, ls in served.items():
        groups[find(s)][1].extend(ls)
    return list(groups.values())


def quantize_node_name(tensor: str | None = None, layer: str | None = None) -> str:
    """The QuantizeLinear node lowbit writes for an activation: on a produced `tensor` (insert_activation_qdq), or
    in front of a conv `layer` (write_qdq)."""
    return f"{layer}/input_Q" if layer is not None else f"{tensor.strip('/').replace('/', '.')}/act_Q"


def insert_activation_qdq(model, tensor: str, act: ActQuant, keep_float: set[int] = frozenset()) -> None:
    """A Q/DQ pair right after `tensor`; every consumer of it reads the dequantized tensor, except the nodes whose
    id() is in `keep_float` (convs a manifest keeps in float) and graph outputs."""
    from onnx import helper

    graph = model.graph
    base = tensor.strip("/").replace("/", ".")
    sname, zname, q, dq = f"{base}.act_scale", f"{base}.act_zp", f"{base}.act_q", f"{base}.act_dq"
    graph.initializer.extend([_tensor(sname, np.asarray(act.scale, np.float32)), _zero_point(act, zname)])
    for n in graph.node:
        if id(n) in keep_float:
            continue
        for i, x in enumerate(n.input):
            if x == tensor:
                n.input[i] = dq
    nodes = [helper.make_node("QuantizeLinear", [tensor, sname, zname], [q], name=quantize_node_name(tensor)),
             helper.make_node("DequantizeLinear", [q, sname, zname], [dq], name=f"{base}/act_DQ")]
    producer = next((k for k, n in enumerate(graph.node) if tensor in n.output), -1)
    for k, n in enumerate(nodes):
        graph.node.insert(producer + 1 + k, n)
    del graph.value_info[:]


def conv_groups(layers: dict[str, ConvRef]) -> dict[str, int]:
    """Layer -> its Conv's `group` attribute (> 1: grouped or depthwise)."""
    return {name: next((a.i for a in ref.node.attribute if a.name == "group"), 1) for name, ref in layers.items()}
