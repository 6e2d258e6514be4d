"""ONNX-native sensitivity, on the exact graph that will be deployed: Q/DQ one Conv at a time, measure
with ONNX Runtime how far the raw head maps move.

Works on an `.onnx` with no PyTorch source (`lowbit sensitivity -m model.onnx --method onnx`); for a
PyTorch model the method first exports lowbit's float ONNX, so the two rankings name the same layers.
Layer names are the Conv weight initializers' names without `.weight`, which torch.onnx and
Ultralytics keep: `model.6.cv1.conv` here is `model.6.cv1.conv` in PyTorch.

Each probe rewrites the graph with the same Q/DQ writer and weight ranges as `lowbit quantize-onnx`
(max per channel / tensor / block; activation ranges from one float pass over the scoring images), so
the score is the damage that path would do. The raw head maps are the outputs of the terminal convs
(no other Conv downstream, the DFL decoder set aside): the level where distortion predicts mAP
(see the distortion method).
"""

from __future__ import annotations

import copy
from collections import deque
import numpy as np

from lowbit.errors import LowbitError
from lowbit.export.onnx_native import load_graph
from lowbit.sensitivity.base import ScoreStore, SensitivityContext, register


def _is_dfl(name: str, w: np.ndarray) -> bool:
    # Ultralytics' DFL conv: one output channel whose fixed weights are 0..reg_max-1
    return name.endswith(".dfl.conv") or (w.ndim == 4 and w.shape[0] == 1 and w.shape[2:] == (1, 1)
                                          and np.allclose(w.reshape(-1), np.arange(w.shape[1])))


def conv_weights(model) -> dict[str, np.ndarray]:
    """Layer name -> float weight, for every Conv whose weight is an initializer, DFL excluded."""
    from onnx import numpy_helper

    from lowbit.export.onnx_native import conv_layers

    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for layer, wname in conv_layers(model).items():
        w = numpy_helper.to_array(inits[wname])
        if not _is_dfl(layer, w):
            out[layer] = w
    return out


def head_outputs(model, layers: dict[str, np.ndarray]) -> list[str]:
    """Outputs of the convs from which no other (scored) conv can be reached: the raw head maps."""
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    convs = {n.input[1].removesuffix(".weight"): n for n in model.graph.node
             if n.op_type == "Conv" and len(n.input) > 1 and n.input[1].removesuffix(".weight") in layers}
    conv_ids = {id(n) for n in convs.values()}
    out = []
    for node in convs.values():
        seen, queue, terminal = set(), deque(node.output), True
        while queue and terminal:
            t = queue.popleft()
            for c in consumers.get(t, []):
                if id(c) in conv_ids:
                    terminal = False
                    break
                if id(c) not in seen:
                    seen.add(id(c))
                    queue.extend(c.output)
        if terminal:
            out.append(node.output[0])
    if not out:
        raise LowbitError("no terminal Conv found: is this a convolutional detector?")
    return out


def onnx_layers(model, imgsz: int) -> list:
    """LayerInfo for each scored Conv of the graph: weight shape, params and MACs at `imgsz`."""
    import onnx

    from lowbit.models.ultralytics import LayerInfo

    weights = conv_weights(model)
    m = copy.deepcopy(model)
    inp = m.graph.input[0].type.tensor_type.shape.dim
    for d, v in zip(inp, (1, 3, imgsz, imgsz)):
        d.ClearField("dim_param")
        d.dim_value = v
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
              for vi in onnx.shape_inference.infer_shapes(m).graph.value_info}
    heads = set(head_outputs(model, weights))
    out = []
    for n in model.graph.node:
        layer = n.input[1].removesuffix(".weight") if n.op_type == "Conv" and len(n.input) > 1 else None
        if layer not in weights:
            continue
        w = weights[layer]
        bias = 0
        if len(n.input) > 2:
            bias = w.shape[0]
        o = shapes.get(n.output[0], [])
        out.append(LayerInfo(name=layer, type="Conv", weight_shape=list(w.shape), params=int(w.size) + bias,
                             macs=int(np.prod(o[1:])) * int(np.prod(w.shape[1:])) if len(o) == 4 else 0,
                             role="head" if n.output[0] in heads else "body"))
    return out


class OnnxProbe:
    """The float graph with its head maps exposed, the reference maps, and one ORT session per probe."""

    def __init__(self, model, images: np.ndarray, threads: int | None = None, weight_range: str = "full"):
        import onnx
        import onnxruntime as ort

        from lowbit.export.onnx_native import _input_ranges

        self.weights = conv_weights(model)
        if not self.weights:
            raise LowbitError("the ONNX graph has no Conv with a float weight initializer to probe "
                              "(already quantized, or weights fed as inputs)")
        self.heads = head_outputs(model, self.weights)
        self.base = copy.deepcopy(model)
        del self.base.graph.output[:]
        self.base.graph.output.extend([onnx.ValueInfoProto(name=t) for t in self.heads])
        self.images = images.astype(np.float32)
        self.weight_range = weight_range
        self.opts = ort.SessionOptions()
        if threads:
            self.opts.intra_op_num_threads = threads
        convs = [n for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 1]
        self.input_of = {n.input[1].removesuffix(".weight"): n.input[0] for n in convs}
        self.node_of = {n.input[1].removesuffix(".weight"): n.name for n in convs}  # ONNX node <-> PyTorch module
        self.ranges = _input_ranges(model, sorted({self.input_of[x] for x in self.weights}), self.images)
        self.reference = self._run(self.base)

    def _run(self, model) -> list[list[np.ndarray]]:
        import onnxruntime as ort

        sess = ort.InferenceSession(model.SerializeToString(), self.opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return [sess.run(self.heads, {name: x[None]}) for x in self.images]

    def score(self, layer: str, fmt) -> float:
        """Mean over head maps of the normalized MSE against the float graph, with only `layer` quantized."""
        from lowbit.export.onnx_native import _weight_amax
        from lowbit.export.onnx_qdq import write_qdq
        from lowbit.quantize.manifest import Manifest

        model = copy.deepcopy(self.base)
        w = self.weights[layer].astype(np.float32)
        manifest = Manifest(name="probe", model="onnx", layers={layer: fmt}, weight_clip="max",
                            weight_range=self.weight_range)
        full = self.weight_range == "full"
        write_qdq(model, manifest, lambda _: (w, _weight_amax(w, fmt, full) if fmt.weight is not None else None,
                                              self.ranges.get(self.input_of[layer]) if fmt.act is not None else None))
        outs = self._run(model)
        errs = [float(((o - r) ** 2).sum() / max(float((r ** 2).sum()), 1e-12))
                for ro, oo in zip(self.reference, outs) for r, o in zip(ro, oo)]
        return float(np.mean(errs))


def float_graph_for(ctx: SensitivityContext):
    """The graph to probe: the given .onnx, or lowbit's float export of the PyTorch model."""
    if ctx.options.get("onnx"):
        return load_graph(ctx.options["onnx"])
    from lowbit.export.onnx_qdq import export_float_onnx

    return export_float_onnx(copy.deepcopy(ctx.detector.net), ctx.detector.imgsz)


@register("onnx")
def onnx_native(ctx: SensitivityContext, store: ScoreStore) -> None:
    from lowbit.progress import track

    todo = [(f, x) for f in ctx.formats for x in ctx.layers if not store.done(x.name, f.name)]
    if not todo:
        return
    model = float_graph_for(ctx)
    images = np.concatenate([b.images.numpy() for b in ctx.batches])
    probe = OnnxProbe(model, images, ctx.options.get("threads"), ctx.options.get("weight_range", "absmax"))
    missing = [x.name for _, x in todo if x.name not in probe.weights]
    if missing:
        raise LowbitError(f"layer {missing[0]}: no Conv of the ONNX graph reads '{missing[0]}.weight'")
    for fmt, layer in track(todo, "onnx", enabled=ctx.progress):
        store.add(layer.name, fmt.name, probe.score(layer.name, fmt), onnx_node=probe.node_of[layer.name])
