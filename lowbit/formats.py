"""Quantization formats: what one layer's weights and input activations are stored and computed in.

A `Format` is data. `to_modelopt()` turns it into the quantizer attributes ModelOpt expects, so
ModelOpt does the fake quantization and calibration while lowbit decides, layer by layer, which
format goes where.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict

from lowbit.errors import LowbitError

DType = Literal["int8", "int4", "fp8"]
Granularity = Literal["per_tensor", "per_channel", "block"]

BITS: dict[str, float] = {"int8": 8, "int4": 4, "fp8": 8, "fp16": 16}


class TensorFormat(BaseModel):
    """How one tensor (a layer's weight or its input activation) is quantized."""

    model_config = ConfigDict(frozen=True)

    dtype: DType
    granularity: Granularity = "per_tensor"
    block_size: int | None = None

    @property
    def bits(self) -> float:
        return BITS[self.dtype]

    def to_modelopt(self) -> dict:
        num_bits = (4, 3) if self.dtype == "fp8" else int(self.bits)
        if self.granularity == "per_channel":
            return {"num_bits": num_bits, "axis": 0}
        if self.granularity == "block":
            # Blocks run along the input channels (axis 1 of a conv/linear weight): ModelOpt's
            # default last-axis blocking would split a conv's 3x3 kernel instead.
            return {"num_bits": num_bits, "block_sizes": {1: self.block_size}}
        return {"num_bits": num_bits, "axis": None}

    @property
    def label(self) -> str:
        if self.granularity == "block":
            return f"{self.dtype}/b{self.block_size}"
        return f"{self.dtype}/{'pc' if self.granularity == 'per_channel' else 'pt'}"


class Format(BaseModel):
    """A layer's weight format and input-activation format; `None` keeps that tensor in float."""

    model_config = ConfigDict(frozen=True)

    name: str
    weight: TensorFormat | None = None
    act: TensorFormat | None = None

    @property
    def w_bits(self) -> float:
        return self.weight.bits if self.weight else 16

    @property
    def a_bits(self) -> float:
        return self.act.bits if self.act else 16

    @property
    def is_float(self) -> bool:
        return self.weight is None and self.act is None


def _w(dtype: DType, gran: Granularity = "per_channel") -> TensorFormat:
    return TensorFormat(dtype=dtype, granularity=gran)


_ACT_INT8 = TensorFormat(dtype="int8")
_ACT_FP8 = TensorFormat(dtype="fp8")

# The presets. Weight granularity defaults to per-channel (the only INT4 that survives on YOLO);
# "W8A8-FP8" follows ModelOpt's FP8_DEFAULT_CFG (per-tensor FP8 weights and activations).
PRESETS: dict[str, Format] = {
    f.name: f
    for f in [
        Format(name="FP16"),
        Format(name="W8A8", weight=_w("int8"), act=_ACT_INT8),
        Format(name="W8A16", weight=_w("int8")),
        Format(name="W4A16", weight=_w("int4")),
        Format(name="W4A8", weight=_w("int4"), act=_ACT_INT8),
        Format(name="W4A8-FP8", weight=_w("int4"), act=_ACT_FP8),
        Format(name="W8A8-FP8", weight=_w("fp8", "per_tensor"), act=_ACT_FP8),
    ]
}


def for_image_input(fmt: Format) -> Format:
    """What a conv that reads the image takes in place of `fmt`: INT8 activations where `fmt` has FP8 ones (with
    INT8 per-channel weights where its weights are FP8). The image is 8-bit data: INT8 holds it at about its own
    resolution, while E4M3's three mantissa bits leave it seven levels between 0.57 and 1.0 of its range. TensorRT
    runs INT8 and FP8 layers in one network."""
    if fmt.act is None or fmt.act.dtype != "fp8":
        return fmt
    weight = fmt.weight
    if weight is not None and weight.dtype == "fp8":
        weight = _w("int8")
    same = [p for p in PRESETS.values() if p.weight == weight and p.act == _ACT_INT8]
    return same[0] if same else Format(name=f"{fmt.name}-int8-input", weight=weight, act=_ACT_INT8)


_GRAN_RE = re.compile(r"^(pt|per[-_]tensor|pc|per[-_]channel|b(\d+)|block(\d+))$", re.I)


def parse_format(spec: str | Format) -> Format:
    """Parse `NAME` or `NAME:GRANULARITY`, e.g. `W4A16`, `W8A8:per-tensor`, `W4A16:b64`.

    The granularity suffix applies to the weights: pt / per-tensor, pc / per-channel, bN / blockN.
    """
    if isinstance(spec, Format):
        return spec
    name, _, gran = spec.strip().partition(":")
    key = {k.upper(): k for k in PRESETS}.get(name.upper())
    if key is None:
        raise LowbitError(f"unknown format {spec!r}; known formats: {', '.join(PRESETS)} "
                          "(optionally with :pt, :pc or :b<block> for the weight granularity)")
    fmt = PRESETS[key]
    if not gran:
        return fmt
    m = _GRAN_RE.match(gran)
    if m is None:
        raise LowbitError(f"unknown granularity {gran!r} in format {spec!r}; use pt, pc or b<block>")
    if fmt.weight is None:
        raise LowbitError(f"format {key} has float weights; a weight granularity makes no sense")
    g = gran.lower()
    if g.startswith("pt") or "tensor" in g:
        weight = fmt.weight.model_copy(update={"granularity": "per_tensor", "block_size": None})
        suffix = "pt"
    elif g.startswith("pc") or "channel" in g:
        weight = fmt.weight.model_copy(update={"granularity": "per_channel", "block_size": None})
        suffix = "pc"
    else:
        size = int(m.group(2) or m.group(3))
        if size < 2:
            raise LowbitError(f"block size must be at least 2 in {spec!r}")
        weight = fmt.weight.model_copy(update={"granularity": "block", "block_size": size})
        suffix = f"b{size}"
    return Format(name=f"{key}:{suffix}", weight=weight, act=fmt.act)


def parse_formats(specs: str | list[str]) -> list[Format]:
    if isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    return [parse_format(s) for s in specs]
