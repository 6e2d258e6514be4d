"""What every sensitivity method shares: its inputs, a resumable score store, and the single-layer probe."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowbit.data.loader import Batch
from lowbit.errors import LowbitError
from lowbit.formats import Format
from lowbit.models.layers import LayerInfo
from lowbit.models.ultralytics import Detector
from lowbit.quantize.manifest import WeightOptions


@dataclass
class SensitivityContext:
    detector: Detector
    batches: list[Batch]  # scoring images (labelled where a method needs labels)
    formats: list[Format]
    layers: list[LayerInfo]  # the layers to score, network order
    device: str = "cpu"
    progress: bool = True
    options: dict = field(default_factory=dict)
    # how probed layers' weights are set (the gradient method uses ModelOpt's max)
    weights: WeightOptions = field(default_factory=lambda: WeightOptions(weight_clip="max", rounding="nearest",
                                                                        weight_range="absmax"))


class ScoreStore:
    """Append-only JSONL of (layer, format) -> score, so a killed sweep resumes where it stopped.

    The first line holds a fingerprint of the inputs; a store made for other inputs is not reused.
    A torn last line (the process died mid-write) is ignored.
    """

    def __init__(self, path: Path, fingerprint: str):
        self.path = Path(path)
        self.scores: dict[tuple[str, str], dict] = {}
        if self.path.is_file():
            lines = self.path.read_text().splitlines()
            head = json.loads(lines[0]) if lines else {}
            if head.get("fingerprint") == fingerprint:
                for line in lines[1:]:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    self.scores[(rec["layer"], rec["format"])] = rec
                return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fingerprint": fingerprint}) + "\n")
        os.replace(tmp, self.path)

    def done(self, layer: str, fmt: str) -> bool:
        return (layer, fmt) in self.scores

    def add(self, layer: str, fmt: str, score: float, **extra) -> None:
        rec = {"layer": layer, "format": fmt, "score": float(score), **extra}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.scores[(layer, fmt)] = rec

    def table(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for (layer, fmt), rec in self.scores.items():
            out.setdefault(layer, {})[fmt] = rec["score"]
        return out


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class SingleLayerProbe:
    """A copy of the network with `fmt` quantizers on every scored layer, calibrated once (ModelOpt),
    then all switched off; `only(layer)` switches one layer's quantizers on.

    Activation ranges come from the float network, as in a normal `mtq.quantize` calibration, so a
    layer probed alone sees the same quantizer it would get in a full scheme.
    """

    def __init__(self, ctx: SensitivityContext, fmt: Format):
        from lowbit.quantize.apply import quantize_layers
        assign = {layer.name: fmt for layer in ctx.layers}
        # probe the format as it will be materialized; the input statistics of weight refinement depend on the float
        # model and images only, so one pass serves every format
        weights = ctx.weights.weight_recipe
        self.net = quantize_layers(ctx.detector.net.to(ctx.device), assign, ctx.batches, "max", weights,
                                   ctx.options.setdefault("gram_cache", {}))
        self.quantizers = {layer.name: [q for q in (getattr(self.net.get_submodule(layer.name), a, None)
                                                    for a in ("weight_quantizer", "input_quantizer"))
                                        if q is not None and q.is_enabled] for layer in ctx.layers}
        for qs in self.quantizers.values():
            for q in qs:
                q.disable()
        self.net.eval()

    @contextlib.contextmanager
    def only(self, layer: str) -> Iterator[torch.nn.Module]:
        qs = self.quantizers[layer]
        for q in qs:
            q.enable()
        try:
            yield self.net
        finally:
            for q in qs:
                q.disable()


def probes(ctx: SensitivityContext, store: ScoreStore, label: str):
    """(format, layer, probe) for every pair the store still lacks; one calibrated probe per format."""
    from lowbit.progress import track

    for fmt in ctx.formats:
        todo = [layer for layer in ctx.layers if not store.done(layer.name, fmt.name)]
        if not todo:
            continue
        probe = SingleLayerProbe(ctx, fmt)
        for layer in track(todo, f"{label} {fmt.name}", enabled=ctx.progress):
            yield fmt, layer, probe


class PrefixCache:
    """Float outputs of every top-level block of an Ultralytics model, per batch.

    Probing a layer in block k changes nothing before block k, so the probe re-runs only blocks
    k..end from the cached inputs (Ultralytics' own `_predict_once` routing). On YOLOv10 this skips
    most of the backbone for head layers; nothing in ModelOpt or Ultralytics offers a partial forward.
    """

    def __init__(self, net: torch.nn.Module, batches: list[torch.Tensor]):
        self.blocks = list(net.model)
        self.inputs = batches
        self.outputs = []
        with torch.no_grad():
            for x in batches:
                ys = []
                for m in self.blocks:
                    if m.f != -1:
                        x = ys[m.f] if isinstance(m.f, int) else [x if j == -1 else ys[j] for j in m.f]
                    x = m(x)
                    ys.append(x)
                self.outputs.append(ys)

    @staticmethod
    def block_of(layer: str) -> int:
        return int(layer.split(".")[1])

    def run_from(self, net: torch.nn.Module, start: int, batch_index: int):
        ys = list(self.outputs[batch_index][:start])
        x = ys[-1] if ys else self.inputs[batch_index]
        blocks = list(net.model)
        for m in blocks[start:]:
            if m.f != -1:
                x = ys[m.f] if isinstance(m.f, int) else [x if j == -1 else ys[j] for j in m.f]
            x = m(x)
            ys.append(x)
        return x


Method = Callable[[SensitivityContext, ScoreStore], None]
# name -> (module, function, needs labels). A new method is one module plus one line here; the table names the
# modules rather than importing them, so they can import this one without a cycle.
METHODS: dict[str, tuple[str, str, bool]] = {
    "distortion": ("lowbit.sensitivity.distortion", "distortion", False),
    "gradient": ("lowbit.sensitivity.gradient", "gradient", True),
    "gradient-selfsup": ("lowbit.sensitivity.gradient", "gradient_selfsup", False),
    "ablation": ("lowbit.sensitivity.ablation", "ablation", True),
    "onnx": ("lowbit.sensitivity.onnx_node", "onnx_native", False),
}
NEEDS_LABELS: set[str] = {name for name, (_, _, labels) in METHODS.items() if labels}


def get_method(name: str) -> Method:
    import importlib

    if name not in METHODS:
        raise LowbitError(f"unknown sensitivity method {name!r}; known: {', '.join(sorted(METHODS))}")
    module, function, _ = METHODS[name]
    return getattr(importlib.import_module(module), function)
