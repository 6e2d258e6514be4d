"""Post-training quantization of a float ONNX detector, in the graph itself (no PyTorch source needed).

Weights: quantized from the graph's own initializers (full-range or absmax scales, per channel / tensor / block),
or taken from a PyTorch checkpoint (GPTQ-rounded, fine-tuned) by the export path. Activations: one pass of ONNX
Runtime over calibration images collects, for every tensor to quantize, its range per image and a sample of its
values; a range is then chosen per tensor (`ActivationCalibration`), and the target decides its encoding
(symmetric INT8 for TensorRT, asymmetric UINT8 for OpenVINO) and where the Q/DQ pairs go (lowbit.targets).

Why ours: ModelOpt's ONNX PTQ and ONNX Runtime's quantizer choose ranges by histogram on the activations alone and
know no per-layer formats; neither weighs a clipped channel by what it does to the conv's output, nor writes INT4
convs a CPU runtime can load.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from lowbit import targets
from lowbit.errors import LowbitError
from lowbit.formats import Format, parse_format
from lowbit.io import atomic_write_bytes
from lowbit.models.onnx_detector import extra_feeds, quiet_session_options
from lowbit.quantize.manifest import Manifest, image_input_rule
from lowbit.quantize.qdq import (ActQuant, ConvRef, activation_groups, conv_groups, conv_layers, conv_weights,
                                 image_convs, insert_activation_qdq, load_graph, quantize_node_name, uniform_layers,
                                 write_qdq)
from lowbit.targets import DEFAULT_TARGET

# Where activation Q/DQ pairs go: in front of each quantized conv (TensorRT's placement), or once on each tensor
# those convs read, before its Concat / Split / pooling (what OpenVINO fuses into the producing conv and keeps in
# INT8 through those ops; the same values quantized the same way, read by every consumer)
Placement = Literal["consumer", "producer"]

RangeMethod = Literal["max", "mean-minmax", "percentile", "mse"]


# Head-map errors (HeadMaps) of artifacts measured so far (docs/results.md, section 7): those within about a point
# of float up to 0.025, those that lost 6 or more points 0.085 and 0.145; lowbit warns past this one
COLLAPSED = 0.05


class ActivationCalibration(BaseModel):
    """How each quantized activation's range is chosen."""

    # Integer activations (FP8 ones always take the observed range: their exponent covers it, and clipping it
    # measured worse). max: the observed range; mean-minmax: the mean over images of each image's min and max
    # (NNCF's default); percentile: the `percentile`-th percentile at each end; mse: the clip that minimizes
    # the conv's output error from quantizing this input, each input channel weighted by its weights' energy
    method: RangeMethod = "mse"
    percentile: float = Field(99.99, gt=50, le=100)
    samples_per_image: int = Field(2048, ge=64)  # values kept per image and input for choosing ranges
    # a tensor whose best INT8 range still loses more than this share of its signal (squared error over squared
    # value, each input channel weighted by the energy of the weights that read it) stays float, and the result says
    # so: one channel far larger than the rest wastes a per-tensor range on all the others
    max_error: float = Field(0.02, gt=0)
    # also keep float the inputs of the `keep_worst` convs whose quantized input most changes the detector's
    # outputs, each measured alone (head maps' relative error) on up to `keep_worst_images` calibration images;
    # targets that quantize in front of each conv (tensorrt, onnxruntime-cpu)
    keep_worst: int = Field(0, ge=0)
    keep_worst_images: int = Field(32, ge=1)
    # Errors that compound through a network's layers (a channel-shuffle backbone re-reading quantized channels
    # block after block) show in no measurement of one tensor alone. So the whole quantized graph is checked
    # against the float graph (head maps, HeadMaps); if its error exceeds `compound_above` (the outputs collapsed),
    # then while it exceeds `compound_floor`, the activation quantizer (a conv's input, or a group of tensors
    # quantized where produced) whose removal takes the most error away stays float, and is named: if it takes at
    # least `compound_share` of it away, or, still past `compound_above`, where several quantizers compound and none
    # dominates alone, MIN_CUT of it. Below a collapse no gain in accuracy was measured (docs/results.md, section 13),
    # so a graph that starts there is left as it is
    compounding: bool = True
    compound_above: float = Field(COLLAPSED, ge=0)
    compound_floor: float = Field(0.01, ge=0)
    compound_share: float = Field(0.15, gt=0, le=1)


@dataclass
class InputStats:
    """One tensor's statistics over the calibration images."""

    lo: float = np.inf
    hi: float = -np.inf
    samples: list[np.ndarray] = field(default_factory=list)  # [C, k] per image: k random positions, every channel
    image_lo: list[float] = field(default_factory=list)
    image_hi: list[float] = field(default_factory=list)

    def add(self, x: np.ndarray, k: int, rng: np.random.Generator) -> None:
        x = x.reshape(x.shape[0], x.shape[1], -1) if x.ndim >= 3 else x.reshape(x.shape[0], x.shape[1], 1)
        self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))
        for img in x:
            self.image_lo.append(float(img.min()))
            self.image_hi.append(float(img.max()))
            pos = rng.choice(img.shape[1], min(k, img.shape[1]), replace=False)
            self.samples.append(img[:, pos])

    @classmethod
    def merged(cls, parts: list["InputStats"]) -> "InputStats":
        """One tensor's statistics from several that share a quantizer (channels no longer kept apart)."""
        out = cls(lo=min(p.lo for p in parts), hi=max(p.hi for p in parts))
        out.image_lo = np.min([p.image_lo for p in parts], axis=0).tolist()
        out.image_hi = np.max([p.image_hi for p in parts], axis=0).tolist()
        out.samples = [np.concatenate([p.samples[i].reshape(1, -1) for p in parts], axis=1)
                       for i in range(len(parts[0].samples))]
        return out

    @property
    def sample(self) -> np.ndarray:
        """[C, n] sampled values of every channel."""
        return np.concatenate(self.samples, axis=1)


def collect_input_stats(model, tensors: list[str], images: np.ndarray, samples_per_image: int = 2048,
                        progress: bool = False, gram_convs: dict[str, ConvRef] | None = None, card=None):
    """Statistics of `tensors` (graph tensors) over `images` ([N, C, H, W] as the graph takes them), from one
    ONNX Runtime pass of the float graph with those tensors as extra outputs. With `gram_convs` ({layer: conv}),
    the same pass also sums each conv's input-patch Gram matrix for GPTQ, and (stats, {layer: InputGram}) is
    returned. `card` (lowbit.models.onnx_detector.ModelCard) says what inputs beside the image take."""
    import onnx
    import onnxruntime as ort
    import torch

    from lowbit.progress import track
    from lowbit.quantize.refine import InputGram

    gram_convs = gram_convs or {}
    stats = {t: InputStats() for t in tensors}
    grams = {n: InputGram() for n in gram_convs}
    shells = {n: _conv_shell(model, ref) for n, ref in gram_convs.items()}
    wanted = sorted(set(tensors) | {ref.input for ref in gram_convs.values()})
    rng = np.random.default_rng(0)
    inputs = {i.name for i in model.graph.input}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    # A graph input asked back as an output comes out of ONNX Runtime as garbage (seen: 1e16, changing between
    # calls): its values are the images themselves.
    inner = [t for t in wanted if t not in inputs]
    probe.graph.output.extend([onnx.ValueInfoProto(name=t) for t in inner if t not in existing])
    try:
        sess = ort.InferenceSession(probe.SerializeToString(), quiet_session_options(),
                                    providers=["CPUExecutionProvider"])
    except Exception as e:
        raise LowbitError(f"ONNX Runtime cannot run the float graph ({str(e).splitlines()[0][:200]})") from None
    what = "calibrating activations" + (" and GPTQ statistics" if grams else "")
    for x in track(images, what, enabled=progress):
        x = x[None].astype(np.float32)
        outs = dict(zip(inner, sess.run(inner, feed(sess, x, card)))) if inner else {}
        for t in tensors:
            v = x if t in inputs else outs[t]
            stats[t].add(v, max(4, samples_per_image // max(v.shape[1], 1)), rng)
        for n, ref in gram_convs.items():
            v = x if ref.input in inputs else outs[ref.input]
            shell, pads = shells[n]
            v = torch.from_numpy(np.ascontiguousarray(v.reshape(1, *v.shape[-3:])))
            grams[n](shell, (torch.nn.functional.pad(v, pads) if any(pads) else v,), None)
    return (stats, grams) if gram_convs else stats


def _conv_shell(model, ref: ConvRef):
    """(a weightless torch Conv2d with the ONNX Conv's geometry, extra (left, right, top, bottom) input padding
    where the graph pads asymmetrically), for lowbit.quantize.gptq.patches."""
    import torch

    attrs = {a.name: list(a.ints) if a.ints else a.i for a in ref.node.attribute}
    shape = conv_weights(model, {"w": ref})["w"].shape
    k = tuple(attrs.get("kernel_shape") or shape[2:])
    pads = attrs.get("pads") or [0] * 4  # [top, left, bottom, right]
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", 0):
        raise LowbitError(f"{ref.node.name}: auto_pad convs are not supported by GPTQ on the graph")
    symmetric = pads[0] == pads[2] and pads[1] == pads[3]
    groups = int(attrs.get("group", 1))
    shell = torch.nn.Conv2d(shape[1] * groups, shape[0], k, tuple(attrs.get("strides") or (1, 1)),
                            (pads[0], pads[1]) if symmetric else 0, tuple(attrs.get("dilations") or (1, 1)), groups,
                            bias=False, device="meta")
    return shell, ((0, 0, 0, 0) if symmetric else (pads[1], pads[3], pads[0], pads[2]))


def feed(sess, x: np.ndarray, card=None) -> dict[str, np.ndarray]:
    """A session's inputs for one image [1, C, H, W]: the image as the graph takes it (torchvision's detection
    exports have no batch axis), and inputs beside it as `card` describes them, for a square image of the input's
    size (what calibration needs: such inputs act after the convs)."""
    first, *rest = sess.get_inputs()
    extra = extra_feeds(card, {i.name: (i.shape, i.type) for i in rest}, None, x.shape[-1]) if rest else {}
    return {first.name: x[0] if len(first.shape) == 3 else x, **extra}


def _input_weights(w: np.ndarray, channels: int) -> np.ndarray:
    """Per input channel of the conv's input (all groups), the energy of the weights that read it."""
    e = (w.astype(np.float64) ** 2).sum(axis=tuple(range(2, w.ndim)))  # [O, I/g]
    per_group_in = w.shape[1]
    groups = channels // per_group_in
    if groups <= 1:
        return e.sum(0)
    out_per_group = w.shape[0] // groups
    return np.concatenate([e[g * out_per_group:(g + 1) * out_per_group].sum(0) for g in range(groups)])


def _quantizer(lo: float, hi: float, dtype: str) -> ActQuant:
    if dtype == "uint8":
        return ActQuant.asymmetric(lo, hi)
    return ActQuant.symmetric(max(abs(lo), abs(hi)), dtype)


def _fake(q: ActQuant, x: np.ndarray) -> np.ndarray:
    if q.dtype == "fp8":
        import ml_dtypes

        s = np.float32(q.scale)
        return (np.clip(x / s, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * s)
    return q.fake(x)


def relative_error(st: InputStats, q: ActQuant, weight: np.ndarray | None) -> float:
    """The share of a tensor's signal its quantizer loses (ActivationCalibration.max_error)."""
    sample = st.sample
    if not sample.size:
        return 0.0
    cw = _input_weights(weight, sample.shape[0]) if weight is not None else np.ones(sample.shape[0])
    cw = (cw / cw.sum())[:, None]
    err = float((cw * (_fake(q, sample) - sample) ** 2).mean(1).sum())
    return err / max(float((cw * sample ** 2).mean(1).sum()), 1e-30)


def choose_range(st: InputStats, dtype: str, cal: ActivationCalibration, weight: np.ndarray | None) -> ActQuant:
    """The quantizer of one conv input: `dtype` int8 / fp8 (symmetric) or uint8 (asymmetric)."""
    if cal.method == "max" or dtype == "fp8" or not np.isfinite(st.lo):
        return _quantizer(st.lo, st.hi, dtype)
    if cal.method == "mean-minmax":
        return _quantizer(float(np.mean(st.image_lo)), float(np.mean(st.image_hi)), dtype)
    sample = st.sample
    if cal.method == "percentile":
        lo = float(np.percentile(sample, 100 - cal.percentile)) if st.lo < 0 else st.lo
        hi = float(np.percentile(sample, cal.percentile))
        return _quantizer(max(lo, st.lo), min(hi, st.hi), dtype)
    # mse: shrink the observed range by a common factor; keep the one whose quantization error, weighted per
    # channel by the energy of the weights that read it, is least
    cw = _input_weights(weight, sample.shape[0]) if weight is not None else np.ones(sample.shape[0])
    cw = (cw / cw.sum())[:, None]
    best, best_err = None, np.inf
    for r in np.linspace(0.3, 1.0, 36):
        q = _quantizer(st.lo * r, st.hi * r, dtype)
        err = float((cw * (_fake(q, sample) - sample) ** 2).mean(1).sum())
        if err < best_err:
            best, best_err = q, err
    return best


class QdqOnnxInfo(BaseModel):
    """A Q/DQ ONNX lowbit wrote, from a checkpoint (`lowbit export`) or straight from a float graph
    (`lowbit quantize-onnx`)."""

    path: str
    target: str
    source: Literal["checkpoint", "onnx"]  # whose weights: a ModelOpt checkpoint's, or the float graph's
    layers_quantized: int
    weight_dtypes: dict[str, int]  # dtype -> count of Conv weights stored in it
    activation_qdq: int
    activation_dtype: str | None = None  # the activation encodings written, e.g. "fp8+int8"
    # where activation ranges come from: calibrated on the graph (with this many images), or the checkpoint's
    calibration: ActivationCalibration | None = None
    calibration_images: int = 0
    # layers whose input INT8 would have lost more than ActivationCalibration.max_error of its signal: kept float,
    # with that share
    activations_kept_float: dict[str, float] = Field(default_factory=dict)
    # of those, the ones ActivationCalibration.keep_worst chose: the head maps' relative error each causes alone
    activations_kept_float_by_output: dict[str, float] = Field(default_factory=dict)
    # and the quantizers (a conv's input, or tensors joined by "+") the compounding check kept float, in the order
    # it took them: the head maps' error once each was
    activations_kept_float_by_compounding: dict[str, float] = Field(default_factory=dict)
    deployable: bool  # every quantized layer runs in low precision on the target (lowbit.targets)
    deploy_note: str
    size_mb: float
    rounding: str  # how the stored weights were rounded (lowbit.quantize.manifest.Rounding)
    # the head maps' relative squared error against the float graph on 8 calibration images (HeadMaps), as written
    head_error: float | None = None
    parity_max_abs: float | None = None  # against the fake-quant model on ONNX Runtime (`lowbit export --parity`)
    parity_mean_abs: float | None = None
    seconds: float | None = None


def _worst_inputs(model, manifest, images, act_dtype: str, cal: ActivationCalibration, card, weight_of) -> dict:
    """{layer: head-map error} of the `cal.keep_worst` convs whose quantized input alone (weights as they will be
    written) most changes the float graph's outputs, beyond those `cal.max_error` keeps float."""
    # imported here: the probe (lowbit.sensitivity) is built on this module
    from lowbit.sensitivity.onnx_node import OnnxProbe

    if images is None or not len(images):
        raise LowbitError("keep_worst needs calibration images (--calib)")
    act_layers = [n for n, f in manifest.layers.items() if f.act is not None]
    probe = OnnxProbe(model, images[:cal.keep_worst_images], act_dtype=act_dtype, calibration=cal, card=card)
    damage = {}
    for n in act_layers:
        fmt = manifest.layers[n]
        dtype = "fp8" if fmt.act.dtype == "fp8" else act_dtype
        st = probe.stats[probe.layers[n].input]
        w = weight_of(n)[0]
        q = choose_range(st, dtype, cal, w)
        if relative_error(st, q, w) > cal.max_error:  # kept float anyway: the K are beyond these
            continue
        damage[n] = probe.error(n, fmt, None, q)
    return {n: damage[n] for n in sorted(damage, key=damage.get, reverse=True)[:cal.keep_worst]}


def quantize_graph(model, manifest, images: np.ndarray | None, act_dtype: str = "int8",
                   calibration: ActivationCalibration | None = None, weights=None, act_amax: dict[str, float] | None = None,
                   layers: dict[str, ConvRef] | None = None, placement: Placement = "consumer",
                   progress: bool = False, card=None) -> dict:
    """Rewrite `model` (a float graph) in place with the formats of `manifest`.

    `act_dtype`: how INT8 activations are encoded, "int8" (symmetric, TensorRT) or "uint8" (asymmetric, OpenVINO);
    FP8 activations are always symmetric. Activation ranges come from calibrating on `images`, or, without
    images, from `act_amax` (layer -> max |input|, e.g. ModelOpt's calibration). `weights(layer)`, when given,
    returns (float weight, amax) for a layer (a PyTorch checkpoint's GPTQ-rounded or fine-tuned weights);
    otherwise weights come from the graph at the manifest's weight range, rounded to nearest (rounding "nearest")
    or by GPTQ on input statistics ONNX Runtime collects from `images` (rounding "gptq", as the PyTorch path
    rounds with the float model's inputs). Returns what was written."""
    cal = calibration or ActivationCalibration()
    layers = conv_layers(model) if layers is None else layers
    float_model = copy.deepcopy(model) if images is not None and len(images) else None  # to check the result on
    missing = [n for n in manifest.layers if n not in layers]
    if missing:
        raise LowbitError(f"manifest {manifest.name!r} names layer {missing[0]!r}, which no Conv of this graph is "
                          f"({len(missing)} such layers; the graph's layers: {', '.join(list(layers)[:4])}...)")
    graph_w = conv_weights(model, {n: layers[n] for n in manifest.layers})
    from lowbit.quantize.refine import gptq_roundable

    if weights is None and (manifest.weight_clip != "max" or manifest.rounding == "gptq-seq"):
        raise LowbitError(f"manifest {manifest.name!r} asks for weight_clip {manifest.weight_clip!r} with rounding "
                          f"{manifest.rounding!r}, which needs the PyTorch model: materialize it with `lowbit quantize "
                          "-m MODEL --manifest M.json`, then `lowbit export`; on the graph lowbit rounds to nearest or "
                          "by GPTQ, with max clipping")
    gptq_convs = {n: layers[n] for n, f in manifest.layers.items()
                  if weights is None and manifest.rounding == "gptq" and gptq_roundable(f.weight)}
    if gptq_convs and (images is None or not len(images)):
        raise LowbitError("GPTQ weight rounding on the graph needs calibration images (--calib), or rounding to "
                          "nearest (--rounding nearest)")
    rounded: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}

    def weight_of(layer: str) -> tuple[np.ndarray, np.ndarray | None]:
        if weights is not None:
            return weights(layer)
        if layer not in rounded:
            fmt = manifest.layers[layer]
            w = graph_w[layer]
            amax = weight_amax(w, fmt, manifest.weight_range) if fmt.weight is not None else None
            if layer in grams and grams[layer].h is not None:
                import torch

                from lowbit.quantize.gptq import gptq_weight

                g = grams[layer]
                w = gptq_weight(torch.from_numpy(w), g.h / max(g.n, 1), torch.from_numpy(np.asarray(amax)),
                                int(fmt.weight.bits), fp8=fmt.weight.dtype == "fp8").numpy()
            rounded[layer] = (w, amax)
        return rounded[layer]

    act_layers = [n for n, f in manifest.layers.items() if f.act is not None]
    groups = []
    if placement == "producer" and act_layers:
        if any(manifest.layers[n].act.dtype != "int8" for n in act_layers):
            raise LowbitError("activations quantized where they are produced must be INT8; FP8 activations go in "
                              "front of each conv (a target with consumer placement, e.g. tensorrt)")
        groups = activation_groups(model, layers, act_layers)
    stats: dict[str, InputStats] = {}
    grams: dict = {}
    calibrate = bool(act_layers) and images is not None and len(images)
    if calibrate or gptq_convs:
        tensors = [] if not calibrate else sorted({t for src, _ in groups for t in src} if groups
                                                   else {layers[n].input for n in act_layers})
        got = collect_input_stats(model, tensors, images, cal.samples_per_image, progress, gptq_convs, card)
        stats, grams = got if gptq_convs else (got, {})
    if act_layers and not calibrate and act_amax is None:
        raise LowbitError("activation formats need calibration images")

    def from_amax(served: list[str], dtype: str) -> ActQuant:
        try:
            a = max(float(act_amax[n]) for n in served)
        except KeyError as e:
            raise LowbitError(f"layer {e.args[0]}: no calibrated input range") from None
        return _quantizer(-a, a, dtype)

    chosen: dict[str, ActQuant] = {}
    kept_float: dict[str, float] = {}  # layer -> the share of its input's signal INT8 would have lost
    signal_loss: dict[str, float] = {}  # the same, for every conv input or tensor group calibrated
    if cal.keep_worst and placement != "consumer":
        raise LowbitError("keep_worst measures each conv's quantized input alone, which a target that quantizes "
                          "where activations are produced (openvino-cpu, openvino-amx) does not write")
    worst = _worst_inputs(model, manifest, images, act_dtype, cal, card, weight_of) if cal.keep_worst else {}
    if placement == "consumer":
        for layer in act_layers:
            dtype = "fp8" if manifest.layers[layer].act.dtype == "fp8" else act_dtype
            if not stats:
                chosen[layer] = from_amax([layer], dtype)
                continue
            st, w = stats[layers[layer].input], weight_of(layer)[0]
            q = choose_range(st, dtype, cal, w)
            err = signal_loss[layer] = relative_error(st, q, w)
            if err > cal.max_error or layer in worst:
                kept_float[layer] = err
            else:
                chosen[layer] = q

    def source(layer: str):
        w, amax = weight_of(layer)
        return w, amax, chosen.get(layer)

    plans = []  # (tensors quantized where produced, the convs they serve, the quantizer they share)
    for src, served in groups:
        if not stats:
            plans.append((src, served, from_amax(served, act_dtype)))
            continue
        direct = len(src) == 1 and all(layers[n].input == src[0] for n in served)
        merged = stats[src[0]] if direct else InputStats.merged([stats[t] for t in src])
        q = choose_range(merged, act_dtype, cal, None)
        # each conv reading the tensor itself weighs its channels by its own weights; through a Concat or Split
        # the channels no longer line up with a conv's, so they count alike
        err = max(relative_error(merged, q, graph_w[n] if direct else None) for n in served)
        signal_loss["+".join(src)] = err
        if err > cal.max_error:
            kept_float.update(dict.fromkeys(served, err))
        else:
            plans.append((src, served, q))
    # the activation quantizers the compounding check may take away: a conv's input, or a group of tensors
    units = ({n: [n] for n in chosen} if placement == "consumer"
             else {"+".join(src): list(served) for src, served, _ in plans})

    def write(m, dropped) -> tuple[Manifest, dict[str, int], int]:
        refs = layers if m is model else conv_layers(m)
        off = set(kept_float) | {n for u in dropped for n in units[u]}
        man = manifest if not off else manifest.model_copy(update={"layers": {
            n: f if n not in off else Format(name=f"{f.name}-act-float", weight=f.weight)
            for n, f in manifest.layers.items()}})
        counts, n_act = write_qdq(m, man, source, refs, activations=placement == "consumer")
        quantized = {n for n, f in man.layers.items() if f.act is not None}
        keep_float = {id(ref.node) for name, ref in refs.items() if name not in quantized}
        for src, _, q in plans:
            if "+".join(src) not in dropped:
                for t in src:
                    insert_activation_qdq(m, t, q, keep_float)
                n_act += len(src)
        return man, counts, n_act

    # the QuantizeLinear nodes write() names for each quantizer (lowbit.quantize.qdq)
    unit_of = ({quantize_node_name(layer=n): n for n in units} if placement == "consumer" else
               {quantize_node_name(t): "+".join(src) for src, _, _ in plans for t in src})
    head_error, compounding = None, {}
    if float_model is not None:
        head_error, compounding = _compounding_check(float_model, write, units, unit_of, images, card, cal, progress)
        kept_float.update({n: signal_loss.get(u, 0.0) for u in compounding for n in units[u]})
    manifest, counts, n_act = write(model, compounding)
    encodings = sorted({"fp8" if manifest.layers[n].act.dtype == "fp8" else act_dtype
                        for n in act_layers if manifest.layers[n].act is not None})
    return {"weight_dtypes": counts, "activation_qdq": n_act, "activation_dtype": "+".join(encodings) or None,
            "activations_kept_float": kept_float, "activations_kept_float_by_output": worst,
            "activations_kept_float_by_compounding": compounding, "head_error": head_error, "manifest": manifest}


# more quantizers kept float than this says the format does not suit the graph, which the user should hear
MAX_COMPOUNDING = 8
SCREEN_IMAGES, SHORTLIST = 2, 4
# past a collapse a removal is taken if it takes this share of the error away: where a format loses everywhere
# (no few quantizers to blame), trading speed for each small gain would not end
MIN_CUT = 0.05


def _compounding_check(float_model, write, units: dict[str, list[str]], unit_of: dict[str, str], images, card,
                       cal: ActivationCalibration, progress: bool) -> tuple[float, dict[str, float]]:
    """(the head maps' error of the graph as it will be written, {quantizer kept float: the error once it was}):
    ActivationCalibration.compound_floor / compound_share, greedily, one quantizer at a time. `write(graph, off)`
    writes the quantized graph onto a float one; `unit_of`: its QuantizeLinear names -> quantizer."""
    from lowbit.progress import track

    maps = HeadMaps(float_model, images, card)
    m = copy.deepcopy(float_model)
    write(m, {})
    if not cal.compounding or not units:
        return maps.error(m, own=True), {}
    switches = Switches(m, unit_of)
    error = maps.session(m, own=True)
    off: dict[str, float] = {}
    err = error(switches.feeds(off))
    if err <= cal.compound_above:  # not collapsed: left as it is
        return err, off
    while err > cal.compound_floor and len(off) < MAX_COMPOUNDING:
        todo = [u for u in units if u not in off]
        if not todo:
            break
        # every quantizer is tried on a couple of images, the most promising few on all: trying each on all
        # costs minutes on graphs whose Q/DQ ONNX Runtime runs slowly (FP8)
        tried = {u: error(switches.feeds({*off, u}), SCREEN_IMAGES) for u in track(
            todo, f"checking errors that compound (head maps {err:.3g})", enabled=progress)}
        trial = {u: error(switches.feeds({*off, u})) for u in sorted(tried, key=tried.get)[:SHORTLIST]}
        best = min(trial, key=trial.get)
        cut = err - trial[best]
        if not (cut >= cal.compound_share * err or err > cal.compound_above and cut >= MIN_CUT * err):
            break
        off[best] = err = trial[best]
    return err, off


def weight_amax(w: np.ndarray, fmt: Format, weight_range: str = "full") -> np.ndarray:
    """The weight amax of `fmt` from the float weight: full-range or absmax scales (lowbit.quantize.refine)."""
    import torch

    from lowbit.quantize.refine import full_range_amax, per_row_integer

    if weight_range == "full" and per_row_integer(fmt.weight):
        return full_range_amax(torch.from_numpy(np.ascontiguousarray(w)), int(fmt.weight.bits),
                               fmt.weight.granularity == "per_channel").numpy().reshape(-1).astype(np.float32)
    a = np.abs(w)
    if fmt.weight.granularity == "per_channel":
        return a.reshape(a.shape[0], -1).max(1)
    if fmt.weight.granularity == "block":
        b = fmt.weight.block_size
        if w.shape[1] % b:
            raise LowbitError(f"block size {b} does not divide {w.shape[1]} input channels")
        return a.reshape(w.shape[0], w.shape[1] // b, b, *w.shape[2:]).max(2).reshape(-1)
    return a.max().reshape(1)


def quantize_onnx(src: str | Path, manifest, out: str | Path, images: np.ndarray | None = None,
                  target: str = DEFAULT_TARGET, calibration: ActivationCalibration | None = None,
                  progress: bool = False, card=None) -> QdqOnnxInfo:
    """Write a Q/DQ copy of the float ONNX `src` with the formats of `manifest`, for `target` (lowbit.targets);
    written only when it is whole. `card`: how the graph is fed (inputs beside the image)."""
    tgt = targets.get_target(target)
    model = load_graph(src) if isinstance(src, (str, Path)) else copy.deepcopy(src)
    layers = conv_layers(model)
    done = quantize_graph(model, manifest, images, tgt.act_dtype, calibration, layers=layers, placement=tgt.placement,
                          progress=progress, card=card)
    info, _ = write_graph(model, out, done, layers, target, manifest, "onnx", calibration=calibration,
                          calibration_images=0 if images is None else len(images))
    return info


class HeadMaps:
    """The float graph's raw head maps (the outputs of the last convs) on the first `n` calibration images, and how
    far a quantized graph's are from them: squared error over squared value, averaged over maps and images. A graph
    that loses a detector's outputs (errors compounding through its layers) shows here before any evaluation."""

    def __init__(self, float_model, images: np.ndarray, card=None, n: int = 8):
        # imported here: lowbit.sensitivity is built on this module
        from lowbit.sensitivity.onnx_node import head_outputs, scored_weights

        self.heads = head_outputs(float_model, scored_weights(float_model))
        sess = self._session(float_model)
        self.feeds = [feed(sess, x[None].astype(np.float32), card) for x in images[:n]]
        self.reference = [sess.run(self.heads, f) for f in self.feeds]

    def _session(self, m, own: bool = False):
        import onnx
        import onnxruntime as ort

        m = m if own else copy.deepcopy(m)
        del m.graph.output[:]
        m.graph.output.extend([onnx.ValueInfoProto(name=t) for t in self.heads])
        opts = quiet_session_options()
        # basic optimization keeps Q/DQ pairs as they are written: ONNX Runtime's CPU fusion has no FP8 kernels
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    def error(self, quantized, own: bool = False) -> float:
        """`own`: the graph is the caller's to spend (its outputs are replaced), saving a copy."""
        return self.session(quantized, own)({})

    def session(self, quantized, own: bool = False):
        """A function of (extra inputs, e.g. Switches.feeds; how many of the images, default all) -> this graph's
        error."""
        from lowbit.sensitivity.onnx_node import head_error

        sess = self._session(quantized, own)
        return lambda extra, n=None: head_error(self.reference[:n], [sess.run(self.heads, {**f, **extra})
                                                                     for f in self.feeds[:n]])


class Switches:
    """A written graph with each activation quantizer (a group of Q/DQ pairs) behind a switch: a scalar bool input
    that, true, makes its consumers read the float tensor instead. One graph and one session try every subset, where
    rewriting the graph for each would cost more than running it."""

    def __init__(self, model, unit_of: dict[str, str]):
        """`unit_of`: QuantizeLinear node name -> the quantizer it belongs to; the graph is changed in place."""
        from onnx import TensorProto, helper

        graph = model.graph
        self.inputs: dict[str, str] = {}
        readers: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                readers.setdefault(i, []).append(n)
        added = []
        for q in list(graph.node):
            unit = unit_of.get(q.name) if q.op_type == "QuantizeLinear" else None
            if unit is None:
                continue
            if unit not in self.inputs:
                self.inputs[unit] = f"lowbit.switch.{len(self.inputs)}"
                graph.input.append(helper.make_tensor_value_info(self.inputs[unit], TensorProto.BOOL, []))
            for dq in readers.get(q.output[0], []):
                y = dq.output[0]
                out = f"{y}.switched"
                for c in readers.get(y, []):
                    for k, i in enumerate(c.input):
                        if i == y:
                            c.input[k] = out
                added.append((dq, helper.make_node("Where", [self.inputs[unit], q.input[0], y], [out],
                                                   name=f"{dq.name}/switch")))
        for dq, w in added:  # right after its DequantizeLinear: topological order holds
            graph.node.insert(list(graph.node).index(dq) + 1, w)

    def feeds(self, off) -> dict[str, np.ndarray]:
        return {name: np.asarray(unit in off) for unit, name in self.inputs.items()}


def head_map_error(float_model, quantized, images: np.ndarray, card=None, n: int = 8) -> float:
    """HeadMaps(...).error(quantized), once."""
    return HeadMaps(float_model, images, card, n).error(quantized)


def write_graph(model, out: str | Path, done: dict, layers: dict, target: str, manifest, source: str,
                **fields) -> tuple[QdqOnnxInfo, bytes]:
    """Check a graph `quantize_graph` rewrote (`done`: what it returned) and write it atomically to `out`: what was
    written, with `target`'s verdict on the layers it quantized, and the graph's bytes. Nothing is written when the
    graph is invalid."""
    import onnx

    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise LowbitError(f"the Q/DQ graph written for {manifest.name} is invalid: {e}") from None
    data = model.SerializeToString()
    atomic_write_bytes(out, data)
    done = dict(done)
    verdict = targets.check(target, done.pop("manifest"), conv_groups(layers))
    info = QdqOnnxInfo(path=str(out), target=target, source=source, layers_quantized=len(manifest.layers),
                       size_mb=len(data) / 1e6, deployable=verdict.deployable, deploy_note=verdict.summary(),
                       rounding=manifest.rounding, **done, **fields)
    return info, data


def uniform_manifest(model, path: str, fmt: str | Format, rounding: str = "gptq") -> Manifest:
    """`fmt` on every Conv of the graph but a DFL decoder, rounded on the graph by GPTQ or to nearest."""
    fmt = parse_format(fmt)
    layers, image = image_input_rule(uniform_layers(model, fmt), image_convs(model))
    return Manifest(name=fmt.name, model=str(path), layers=layers, weight_clip="max", rounding=rounding,
                    origin={"kind": "onnx-native", **image})
