"""ONNX-native sensitivity, on the exact graph that will be deployed: Q/DQ one Conv at a time, measure
with ONNX Runtime how far the raw head maps move.

Works on an `.onnx` with no PyTorch source (`lowbit sensitivity -m model.onnx --method onnx`); for a
PyTorch model the method first exports lowbit's float ONNX, so the two rankings name the same layers
(lowbit.quantize.qdq names a Conv by its PyTorch module where the graph says it).

Each probe rewrites the graph with the same writer, weight scales and activation calibration as
`lowbit quantize-onnx` (ranges chosen once from one float pass over the scoring images), so the score is the
damage that path would do. The raw head maps are the outputs of the terminal convs (no other Conv downstream,
the DFL decoder set aside): the level where distortion predicts mAP (see the distortion method).
"""

from __future__ import annotations

import copy
from pathlib import Path
from collections import deque

import numpy as np

from lowbit.errors import LowbitError
from lowbit.quantize.qdq import conv_layers, conv_weights, image_convs, is_dfl, load_graph
from lowbit.models.onnx_detector import quiet_session_options
from lowbit.quantize.onnx_ptq import feed
from lowbit.sensitivity.base import ScoreStore, SensitivityContext


def scored_weights(model) -> dict[str, np.ndarray]:
    """Layer name -> float weight of every Conv that may be quantized (a DFL decoder never is)."""
    return {n: w for n, w in conv_weights(model).items() if not is_dfl(n, w)}


def head_outputs(model, layers: dict[str, np.ndarray]) -> list[str]:
    """Outputs of the convs from which no other (scored) conv can be reached: the raw head maps."""
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    convs = {name: ref.node for name, ref in conv_layers(model).items() if name in layers}
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

    from lowbit.models.layers import LayerInfo

    weights = scored_weights(model)
    refs = conv_layers(model)
    m = copy.deepcopy(model)
    inp = m.graph.input[0].type.tensor_type.shape.dim
    for d, v in zip(inp, (1, 3, imgsz, imgsz)):
        d.ClearField("dim_param")
        d.dim_value = v
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
              for vi in onnx.shape_inference.infer_shapes(m).graph.value_info}
    heads = set(head_outputs(model, weights))
    image = image_convs(model, refs)
    out = []
    for layer, ref in refs.items():
        if layer not in weights:
            continue
        n, w = ref.node, weights[layer]
        bias = 0
        if len(n.input) > 2:
            bias = w.shape[0]
        o = shapes.get(n.output[0], [])
        out.append(LayerInfo(name=layer, type="Conv", weight_shape=list(w.shape), params=int(w.size) + bias,
                             macs=int(np.prod(o[1:])) * int(np.prod(w.shape[1:])) if len(o) == 4 else 0,
                             role="head" if n.output[0] in heads else "body", reads_image=layer in image))
    return out


def head_error(reference: list[list[np.ndarray]], outs: list[list[np.ndarray]]) -> float:
    """Per image and head map, the squared error over the squared reference, averaged."""
    return float(np.mean([((o - r) ** 2).sum() / max(float((r ** 2).sum()), 1e-12)
                          for ro, oo in zip(reference, outs) for r, o in zip(ro, oo)]))


class OnnxProbe:
    """The float graph with its head maps exposed, the reference maps, every conv input's calibration statistics,
    and one ORT session per probe."""

    def __init__(self, model, images: np.ndarray, threads: int | None = None, weight_range: str = "full",
                 act_dtype: str = "int8", calibration=None, card=None):
        import onnx

        from lowbit.quantize.onnx_ptq import ActivationCalibration, collect_input_stats

        self.weights = scored_weights(model)
        if not self.weights:
            raise LowbitError("the ONNX graph has no Conv with a float weight to probe "
                              "(already quantized, or weights fed as inputs)")
        self.layers = conv_layers(model)
        self.heads = head_outputs(model, self.weights)
        self.base = copy.deepcopy(model)
        del self.base.graph.output[:]
        self.base.graph.output.extend([onnx.ValueInfoProto(name=t) for t in self.heads])
        self.images = images.astype(np.float32)
        self.weight_range, self.act_dtype = weight_range, act_dtype
        self.calibration = calibration or ActivationCalibration()
        self.opts = quiet_session_options(threads)
        self.node_of = {name: ref.node.name for name, ref in self.layers.items()}  # ONNX node <-> layer
        self.card = card
        self.stats = collect_input_stats(model, sorted({self.layers[x].input for x in self.weights}), self.images,
                                         self.calibration.samples_per_image, card=card)
        self.reference = self._run(self.base)

    def _run(self, model) -> list[list[np.ndarray]]:
        import onnxruntime as ort

        sess = ort.InferenceSession(model.SerializeToString(), self.opts, providers=["CPUExecutionProvider"])
        return [sess.run(self.heads, feed(sess, x[None], self.card)) for x in self.images]

    def score(self, layer: str, fmt) -> float:
        """Mean over head maps of the normalized MSE against the float graph, with only `layer` quantized."""
        from lowbit.quantize.onnx_ptq import choose_range, weight_amax

        w = self.weights[layer].astype(np.float32)
        act = None
        if fmt.act is not None:
            dtype = "fp8" if fmt.act.dtype == "fp8" else self.act_dtype
            act = choose_range(self.stats[self.layers[layer].input], dtype, self.calibration, w)
        return self.error(layer, fmt, weight_amax(w, fmt, self.weight_range) if fmt.weight is not None else None, act)

    def error(self, layer: str, fmt, amax, act) -> float:
        """The head maps' error with only `layer` quantized: its weights in `fmt` at `amax` (None: float), its input
        by the quantizer `act` (None: float)."""
        from lowbit.formats import Format
        from lowbit.quantize.manifest import Manifest
        from lowbit.quantize.qdq import write_qdq

        fmt = Format(name="probe", weight=fmt.weight if amax is not None else None,
                     act=fmt.act if act is not None else None)
        model = copy.deepcopy(self.base)
        w = self.weights[layer].astype(np.float32)
        manifest = Manifest(name="probe", model="onnx", layers={layer: fmt}, weight_clip="max",
                            rounding="nearest", weight_range=self.weight_range)
        write_qdq(model, manifest, lambda _: (w, amax, act), conv_layers(model))
        return head_error(self.reference, self._run(model))


def float_graph_for(ctx: SensitivityContext):
    """The graph to probe: the given .onnx, or lowbit's float export of the PyTorch model."""
    graph = ctx.options.get("onnx")
    if graph is not None:
        return load_graph(graph) if isinstance(graph, (str, Path)) else copy.deepcopy(graph)
    from lowbit.export.onnx_qdq import export_float_onnx

    return export_float_onnx(copy.deepcopy(ctx.detector.net), ctx.detector.imgsz)


def onnx_native(ctx: SensitivityContext, store: ScoreStore) -> None:
    from lowbit.progress import track

    todo = [(f, x) for f in ctx.formats for x in ctx.layers if not store.done(x.name, f.name)]
    if not todo:
        return
    model = float_graph_for(ctx)
    images = np.concatenate([b.images.numpy() for b in ctx.batches])
    probe = OnnxProbe(model, images, ctx.options.get("threads"), ctx.weights.weight_range,
                      ctx.options.get("act_dtype", "int8"), card=ctx.options.get("card"))
    missing = [x.name for _, x in todo if x.name not in probe.weights]
    if missing:
        raise LowbitError(f"layer {missing[0]}: no Conv of the ONNX graph is that layer")
    for fmt, layer in track(todo, "onnx", enabled=ctx.progress):
        store.add(layer.name, fmt.name, probe.score(layer.name, fmt), onnx_node=probe.node_of[layer.name])
