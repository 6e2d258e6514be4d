"""The scheme manifest: every layer's exact format, serialized. It is the contract between search
and materialization (torchao's FqnToConfig idea: module name -> config)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from lowbit.errors import LowbitError
from lowbit.formats import Format, for_image_input, parse_format
from lowbit.io import read_json, write_json
from lowbit.models.layers import LayerInfo

# Whether each integer weight channel's clip is chosen by the layer's output error ("output") or is ModelOpt's max
# ("max"); integer weights only.
WeightClip = Literal["max", "output"]
# How weights are rounded onto their grid: to nearest, by GPTQ (integer and FP8 grids), or by GPTQ layer by layer on
# the quantized network's own inputs ("gptq-seq", lowbit.quantize.sequential; integer weights only).
Rounding = Literal["nearest", "gptq", "gptq-seq"]
# Where an integer weight scale comes from: "absmax" = ModelOpt's max calibration (the largest |w| maps to
# 2^(b-1)-1, so the level -2^(b-1) goes unused); "full" = the finer of max(w)/(2^(b-1)-1) and
# -min(w)/2^(b-1), so a channel whose negative extreme dominates also uses -2^(b-1)
# (lowbit.quantize.refine.full_range_amax).
WeightRange = Literal["absmax", "full"]

# lowbit 0.1 named clip and rounding together in `weight_clip`
_COMBINED = {"max": ("max", "nearest"), "output": ("output", "nearest"), "gptq": ("max", "gptq"),
             "output+gptq": ("output", "gptq"), "gptq-seq": ("max", "gptq-seq")}


def split_weight_clip(data):
    """A manifest or config that names `weight_clip` but no `rounding` was written when `weight_clip` carried both:
    read it as it was made (e.g. "gptq" = max clip, GPTQ rounding; "max" = max clip, nearest)."""
    if isinstance(data, dict) and data.get("rounding") is None and data.get("weight_clip") in _COMBINED:
        clip, rounding = _COMBINED[data["weight_clip"]]
        data = {**data, "weight_clip": clip, "rounding": rounding}
    return data


class WeightRecipe(BaseModel, frozen=True):
    """How integer weights are set after ModelOpt's calibration, as three independent choices: where the scale
    starts (`range`), whether each channel's clip is then chosen by the layer's output error (`clip`), and how
    values are rounded onto the grid (`rounding`)."""

    range: WeightRange = "full"
    clip: WeightClip = "max"
    rounding: Rounding = "gptq"

    @property
    def refines(self) -> bool:
        return self.clip != "max" or self.rounding != "nearest"


class WeightOptions(BaseModel):
    """The weight recipe's fields, shared by every config and the manifest (one vocabulary)."""

    weight_clip: WeightClip = "max"
    rounding: Rounding = "gptq"
    weight_range: WeightRange = "full"

    @model_validator(mode="before")
    @classmethod
    def _old_weight_clip(cls, data):
        return split_weight_clip(data)

    def weight_options(self) -> dict:
        """Just the three weight fields, to hand on to a manifest or another config."""
        return {k: getattr(self, k) for k in WeightOptions.model_fields}

    @property
    def weight_recipe(self) -> WeightRecipe:
        return WeightRecipe(range=self.weight_range, clip=self.weight_clip, rounding=self.rounding)


class SchemeStats(BaseModel):
    quantizable_params: int
    effective_weight_bits: float
    int4_share: float  # share of quantizable weight parameters stored as INT4
    mean_act_bits: float  # MAC-weighted
    bit_ops_g: float  # sum over layers of MACs * w_bits * a_bits, in G
    weight_mb: float  # weight storage of the quantizable layers


class Manifest(WeightOptions):
    name: str
    model: str
    imgsz: int = 640
    algorithm: str = "max"  # ModelOpt calibration algorithm
    # weight_range: a manifest file without the field predates it and loads as "absmax"
    layers: dict[str, Format]
    stats: SchemeStats | None = None
    origin: dict = Field(default_factory=dict)  # the config / search that produced it

    @classmethod
    def uniform(cls, model: str, layers: list[LayerInfo], fmt: Format | str, algorithm: str = "max",
                weights: WeightOptions = WeightOptions(), imgsz: int = 640) -> "Manifest":
        fmt = parse_format(fmt)
        assign, origin = image_input_rule({layer.name: fmt for layer in layers if layer.quantizable},
                                          {layer.name for layer in layers if layer.reads_image})
        m = cls(name=fmt.name, model=model, imgsz=imgsz, algorithm=algorithm, **weights.weight_options(),
                layers=assign, origin={"kind": "uniform", "format": fmt.name, **origin})
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
