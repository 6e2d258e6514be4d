"""The scheme manifest: every layer's exact format, serialized. It is the contract between search
and materialization (torchao's FqnToConfig idea: module name -> config)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from lowbit.errors import LowbitError
from lowbit.formats import Format, for_image_input, parse_format
from lowbit.io import read_json, write_json
from lowbit.models.layers import LayerInfo

# How weights are rounded after ModelOpt calibration: "max" = ModelOpt alone; "output" = per-channel clip chosen
# by the layer output error; "gptq" = GPTQ rounding (integer and FP8 grids); "output+gptq" = both; "gptq-seq" =
# GPTQ layer by layer on the quantized network's own inputs (lowbit.quantize.sequential). Clipping and gptq-seq
# act on integer weights only.
WeightRefine = Literal["max", "output", "gptq", "output+gptq", "gptq-seq"]
# Where an integer weight scale comes from: "absmax" = ModelOpt's max calibration (the largest |w| maps to
# 2^(b-1)-1, so the level -2^(b-1) goes unused); "full" = the finer of max(w)/(2^(b-1)-1) and
# -min(w)/2^(b-1), so a channel whose negative extreme dominates also uses -2^(b-1)
# (lowbit.quantize.refine.full_range_amax).
WeightRange = Literal["absmax", "full"]


class WeightRecipe(BaseModel, frozen=True):
    """How integer weights are set after ModelOpt's calibration, as three independent choices: where the scale
    starts (`range`), whether each channel's clip is then chosen by the layer's output error (`clip`), and how
    values are rounded onto the grid (`rounding`: nearest, GPTQ, or GPTQ layer by layer on the quantized
    network's own inputs). A manifest stores it as its `weight_range` and `weight_clip` names."""

    range: WeightRange = "full"
    clip: Literal["max", "output"] = "max"
    rounding: Literal["nearest", "gptq", "gptq-seq"] = "gptq"

    @classmethod
    def of(cls, weight_clip: WeightRefine = "gptq", weight_range: WeightRange = "full") -> "WeightRecipe":
        clip, _, rounding = {"max": ("max", "", "nearest"), "output": ("output", "", "nearest"),
                             "gptq": ("max", "", "gptq"), "output+gptq": ("output", "", "gptq"),
                             "gptq-seq": ("max", "", "gptq-seq")}[weight_clip]
        return cls(range=weight_range, clip=clip, rounding=rounding)

    @property
    def refines(self) -> bool:
        return self.clip != "max" or self.rounding != "nearest"


class SchemeStats(BaseModel):
    quantizable_params: int
    effective_weight_bits: float
    int4_share: float  # share of quantizable weight parameters stored as INT4
    mean_act_bits: float  # MAC-weighted
    bit_ops_g: float  # sum over layers of MACs * w_bits * a_bits, in G
    weight_mb: float  # weight storage of the quantizable layers


class Manifest(BaseModel):
    name: str
    model: str
    imgsz: int = 640
    algorithm: str = "max"  # ModelOpt calibration algorithm
    weight_clip: WeightRefine = "gptq"
    weight_range: WeightRange = "full"  # a manifest file without the field predates it: loads as "absmax"
    layers: dict[str, Format]
    stats: SchemeStats | None = None
    origin: dict = Field(default_factory=dict)  # the config / search that produced it

    @property
    def weight_recipe(self) -> WeightRecipe:
        return WeightRecipe.of(self.weight_clip, self.weight_range)

    @classmethod
    def uniform(cls, model: str, layers: list[LayerInfo], fmt: Format | str, algorithm: str = "max",
                weight_clip: str = "gptq", imgsz: int = 640, weight_range: str = "full") -> "Manifest":
        fmt = parse_format(fmt)
        assign, origin = image_input_rule({layer.name: fmt for layer in layers if layer.quantizable},
                                          {layer.name for layer in layers if layer.reads_image})
        m = cls(name=fmt.name, model=model, imgsz=imgsz, algorithm=algorithm, weight_clip=weight_clip,
                weight_range=weight_range, layers=assign, origin={"kind": "uniform", "format": fmt.name, **origin})
        m.stats = scheme_stats(m.layers, layers)
        return m

    def validate_against(self, layers: list[LayerInfo]) -> None:
        by_name = {layer.name: layer for layer in layers}
        for name in self.layers:
            if name not in by_name:
                close = [n for n in by_name if n.split(".")[-2:] == name.split(".")[-2:]][:3]
                hint = f" (similar: {', '.join(close)})" if close else ""
                raise LowbitError(f"manifest {self.name!r} names layer {name!r}, which the model does not have{hint}")
            if not by_name[name].quantizable:
                raise LowbitError(f"manifest {self.name!r} quantizes layer {name!r}, which must stay float")

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.model_dump(mode="json"))

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        data = read_json(path)
        if isinstance(data, dict):
            data.setdefault("weight_range", "absmax")  # written before full-range scales: reproduce it as made
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise LowbitError(f"{path}: not a valid lowbit manifest ({e.errors()[0]['loc']}: {e.errors()[0]['msg']})") from None


def image_input_rule(assign: dict[str, Format], image_layers: set[str]) -> tuple[dict[str, Format], dict]:
    """`assign` with every layer that reads the image at `for_image_input` of its format, and what changed (for a
    manifest's origin). Every scheme lowbit builds (uniform, searched, ONNX-native) goes through it; a manifest
    written by hand is taken as written."""
    out = {n: for_image_input(f) if n in image_layers else f for n, f in assign.items()}
    changed = {n: out[n].name for n in assign if out[n] != assign[n]}
    return out, ({"image_input": changed} if changed else {})


def scheme_stats(assign: dict[str, Format], layers: list[LayerInfo]) -> SchemeStats:
    q = [layer for layer in layers if layer.quantizable]
    total = sum(layer.params for layer in q) or 1
    macs = sum(layer.macs for layer in q) or 1
    fp16 = Format(name="FP16")
    wbits = sum(layer.params * assign.get(layer.name, fp16).w_bits for layer in q)
    int4 = sum(layer.params for layer in q if (f := assign.get(layer.name)) and f.weight and f.weight.dtype == "int4")
    abits = sum(layer.macs * assign.get(layer.name, fp16).a_bits for layer in q)
    bops = sum(layer.macs * assign.get(layer.name, fp16).w_bits * assign.get(layer.name, fp16).a_bits for layer in q)
    return SchemeStats(quantizable_params=total, effective_weight_bits=wbits / total, int4_share=int4 / total,
                       mean_act_bits=abits / macs, bit_ops_g=bops / 1e9, weight_mb=wbits / 8 / 1e6)
