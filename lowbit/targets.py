"""Deployment targets: which runtime will run an artifact, which formats it runs in low precision, and how the
artifact must be written for it.

A scheme is only as good as what its target runs: a format the target computes in float (weight-only INT8 on a
CPU, INT4 convolutions anywhere) buys no speed there, and an activation encoding a runtime mishandles computes
wrong results (OpenVINO and signed INT8 activations read by a Concat, docs/openvino-int8-concat.md). So a study
names its target, every scheme is checked against it layer by layer, and its artifact is measured on the target's
runtime.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from lowbit.errors import LowbitError
from lowbit.formats import Format

TargetName = Literal["openvino-cpu", "openvino-amx", "tensorrt", "onnxruntime-cpu", "size"]
DEFAULT_TARGET: TargetName = "openvino-cpu"  # every verb and config that takes a target defaults to this one


class Target(BaseModel):
    name: TargetName
    description: str
    # the runtime its artifacts are measured on (lowbit.evaluate.runners); TensorRT cannot be had here, so its
    # artifacts are scored with ONNX Runtime, which computes the same Q/DQ arithmetic
    runtime: str
    act_dtype: Literal["int8", "uint8"]  # how INT8 activations are encoded
    placement: Literal["consumer", "producer"]  # where activation Q/DQ pairs go (lowbit.quantize.onnx_ptq)
    speed: bool  # whether the study times its schemes (size: storage only)


TARGETS: dict[str, Target] = {t.name: t for t in [
    Target(name="openvino-cpu", runtime="openvino", act_dtype="uint8", placement="producer", speed=True,
           description="OpenVINO on the CPU: INT8 convolutions (VNNI/AMX), asymmetric UINT8 activations quantized "
                       "where they are produced, float ops in the runtime's default precision"),
    # On Xeons with AMX, OpenVINO's INT8 convolution pays for an activation zero point (its compensation over
    # the padded border and the asymmetric input) enough that 3x3 convs run slower than in BF16; with symmetric
    # activations they do not (docs/results.md, "Speed on an AMX Xeon"). Signed INT8 read by a Concat is
    # mis-computed on the AVX-512/AVX2 kernels of CPUs without AMX (docs/openvino-int8-concat.md), so this
    # encoding is its own target, not openvino-cpu's; `lowbit bench` checks it on the CPU it runs on.
    Target(name="openvino-amx", runtime="openvino", act_dtype="int8", placement="producer", speed=True,
           description="OpenVINO on Intel Xeons with AMX: INT8 convolutions, symmetric INT8 activations quantized "
                       "where they are produced, float ops in the runtime's default precision (BF16)"),
    Target(name="tensorrt", runtime="onnxruntime", act_dtype="int8", placement="consumer", speed=False,
           description="TensorRT: symmetric INT8 or FP8 Q/DQ in front of each convolution (FP8 on Hopper and newer); "
                       "accuracy measured with ONNX Runtime (TensorRT is not available here)"),
    Target(name="onnxruntime-cpu", runtime="onnxruntime", act_dtype="uint8", placement="producer", speed=True,
           description="ONNX Runtime on the CPU: INT8 Q/DQ convolutions fused into QLinearConv"),
    Target(name="size", runtime="onnxruntime", act_dtype="int8", placement="consumer", speed=False,
           description="storage only: the smallest model within the accuracy bound; INT4 weights allowed, no runtime "
                       "runs them faster"),
]}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise LowbitError(f"unknown target {name!r}; use one of {', '.join(TARGETS)}")
    return TARGETS[name]


def layer_verdict(target: str, fmt: Format | None, groups: int = 1) -> tuple[bool, str]:
    """(runs in low precision on the target, why). `groups` > 1: a grouped or depthwise convolution."""
    if fmt is None or fmt.is_float:
        return False, "float"
    w, a = fmt.weight, fmt.act
    if target == "size":
        return True, "stored in low precision"
    if w is not None and w.granularity == "block":
        return False, "block-wise weight scales: no convolution kernel takes them"
    if w is not None and w.dtype == "int4":
        return False, ("INT4 convolution weights: no runtime has an INT4 convolution (TensorRT's INT4 is weight-only "
                       "GEMM; OpenVINO and ONNX Runtime dequantize them to float)")
    if a is None:
        return False, "weight-only: the weights are dequantized and the convolution runs in float"
    if target == "tensorrt":
        if w is None or w.dtype != a.dtype:
            return False, f"weights {w.dtype if w else 'float'} with {a.dtype} activations: no TensorRT kernel"
        if a.dtype == "fp8" and groups > 1:
            return False, "FP8 grouped/depthwise convolution: TensorRT has no FP8 kernel for it and runs it in FP16"
        return True, f"{a.dtype.upper()} convolution" + (" (Hopper or newer)" if a.dtype == "fp8" else "")
    if a.dtype == "fp8" or (w is not None and w.dtype == "fp8"):
        return False, f"FP8: {target} has no FP8 convolution kernel on the CPU"
    if w is None:
        return False, "INT8 activations with float weights: no integer kernel"
    return True, "INT8 convolution"


class Deployability(BaseModel):
    target: str
    low_precision: int  # quantized layers the target runs in low precision
    quantized: int  # layers the manifest quantizes
    not_low_precision: dict[str, str]  # layer -> why the target computes it in float

    @property
    def deployable(self) -> bool:
        """Every quantized layer runs in low precision on the target (or, for `size`, is stored so)."""
        return not self.not_low_precision

    def summary(self) -> str:
        if self.deployable:
            return f"all {self.quantized} quantized layers run in low precision on {self.target}"
        why = sorted(set(self.not_low_precision.values()))
        return (f"{len(self.not_low_precision)} of {self.quantized} quantized layers run in float on {self.target}: "
                + "; ".join(why))


def check(target: str, manifest, groups: dict[str, int] | None = None) -> Deployability:
    """Every quantized layer of `manifest` against `target`'s rules; `groups`: layer -> convolution groups."""
    get_target(target)
    groups = groups or {}
    bad = {}
    for name, fmt in manifest.layers.items():
        ok, why = layer_verdict(target, fmt, groups.get(name, 1))
        if not ok:
            bad[name] = why
    return Deployability(target=target, low_precision=len(manifest.layers) - len(bad), quantized=len(manifest.layers),
                         not_low_precision=bad)
