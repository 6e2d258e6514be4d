"""Materialize a manifest with ModelOpt: exact per-layer quantizer patterns, calibrate, verify.

Uniform presets go through the same path (a manifest with one format everywhere), so there is one
way a model gets quantized and one check that it got what was asked.
"""

from __future__ import annotations

import contextlib
import copy
import io
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.formats import Format
from lowbit.models.ultralytics import Detector, list_layers
from lowbit.quantize.manifest import Manifest, WeightRecipe


def _escape(name: str) -> str:
    # ModelOpt matches quantizer names with fnmatch; a module name never holds * or ?, but [ ] would glob.
    return name.replace("[", "[[]")


def format_cfg(fmt: Format) -> dict:
    """A whole-model ModelOpt config for one format (every weight / input quantizer), as ModelOpt's own
    auto_quantize takes its candidate formats."""
    entries: list[dict] = [{"quantizer_name": "*", "enable": False}]
    if fmt.weight is not None:
        entries.append({"quantizer_name": "*weight_quantizer", "cfg": fmt.weight.to_modelopt()})
    if fmt.act is not None:
        entries.append({"quantizer_name": "*input_quantizer", "cfg": fmt.act.to_modelopt()})
    return {"quant_cfg": entries, "algorithm": "max"}


def quant_cfg(assign: dict[str, Format], algorithm: str = "max") -> dict:
    entries: list[dict] = [{"quantizer_name": "*", "enable": False}]
    for name, fmt in assign.items():
        if fmt.weight is not None:
            entries.append({"quantizer_name": f"{_escape(name)}.weight_quantizer", "cfg": fmt.weight.to_modelopt()})
        if fmt.act is not None:
            entries.append({"quantizer_name": f"{_escape(name)}.input_quantizer", "cfg": fmt.act.to_modelopt()})
    return {"quant_cfg": entries, "algorithm": algorithm}


def _expected(q, tf) -> bool:
    if tf is None:
        return not q.is_enabled
    want = tf.to_modelopt()
    bits_ok = (tuple(q.num_bits) if isinstance(q.num_bits, (tuple, list)) else q.num_bits) == want["num_bits"]
    if "block_sizes" in want:
        gran_ok = bool(q.block_sizes) and q.block_sizes.get(1) == want["block_sizes"][1]
    else:
        gran_ok = q.axis == want["axis"] and not q.block_sizes
    return q.is_enabled and bits_ok and gran_ok


def verify(net: torch.nn.Module, assign: dict[str, Format]) -> None:
    """Every layer got exactly its format; every other quantizer is off. Raises naming the layer."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    for name, mod in net.named_modules():
        if not isinstance(mod, TensorQuantizer):
            continue
        layer, _, kind = name.rpartition(".")
        fmt = assign.get(layer)
        if fmt is None:
            if mod.is_enabled:
                raise LowbitError(f"layer {layer}: {kind} is enabled but the manifest keeps it float")
            continue
        tf = fmt.weight if kind == "weight_quantizer" else fmt.act if kind == "input_quantizer" else None
        if kind not in ("weight_quantizer", "input_quantizer"):
            if mod.is_enabled:
                raise LowbitError(f"layer {layer}: unexpected quantizer {kind} is enabled")
            continue
        if not _expected(mod, tf):
            raise LowbitError(f"layer {layer}: {kind} is {mod} but the manifest says {tf.label if tf else 'float'}")
    for layer in assign:
        mod = net.get_submodule(layer)
        if not hasattr(mod, "weight_quantizer"):
            raise LowbitError(f"layer {layer}: ModelOpt did not convert it to a quantized module")


def quantize_layers(float_net: torch.nn.Module, assign: dict[str, Format], calib_batches, algorithm: str = "max",
                    weights: WeightRecipe = WeightRecipe(), gram_cache: dict | None = None) -> torch.nn.Module:
    """The one way lowbit quantizes a network: a fake-quantized copy of `float_net` with each layer of `assign` at
    its format (ModelOpt), calibrated on `calib_batches`, integer weights set as `weights` says (range, clip,
    rounding), then verified layer by layer. Pass the same `gram_cache` dict to repeated calls on one model
    and calibration set: weight refinement then collects each layer's input statistics once."""
    import modelopt.torch.quantization as mtq

    net = copy.deepcopy(float_net)
    dev = next(net.parameters()).device

    def forward_loop(model):
        with torch.no_grad():
            for b in calib_batches:
                model(b.images.to(dev))

    with contextlib.redirect_stdout(io.StringIO()):
        net = mtq.quantize(net, quant_cfg(assign, algorithm), forward_loop=forward_loop)
    if weights.range == "full":
        from lowbit.quantize.refine import set_full_range

        set_full_range(net, float_net, assign)
    if weights.refines:
        from lowbit.quantize.refine import refine_weights

        refine_weights(net, float_net, assign, calib_batches, weights, gram_cache)
    verify(net, assign)
    return net.eval()


def apply_manifest(detector: Detector, manifest: Manifest, calib_batches, gram_cache: dict | None = None) -> torch.nn.Module:
    """A fake-quantized copy of the detector's network as `manifest` says, calibrated on `calib_batches`, verified."""
    manifest.validate_against(list_layers(detector.net, detector.imgsz))
    if not calib_batches and any(f.act is not None for f in manifest.layers.values()):
        raise LowbitError("activation quantization needs calibration images (none were given)")
    return quantize_layers(detector.net, manifest.layers, calib_batches, manifest.algorithm, manifest.weight_recipe,
                           gram_cache)


def save_quantized(net: torch.nn.Module, manifest: Manifest, out_dir: str | Path) -> Path:
    """ModelOpt checkpoint (`mto.save`) plus the manifest that restores it."""
    import modelopt.torch.opt as mto

    from lowbit.io import atomic_write_bytes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    mto.save(net, buf)
    atomic_write_bytes(out / "modelopt.pth", buf.getvalue())
    manifest.save(out / "manifest.json")
    return out


def checkpoint_manifest(ckpt_dir: str | Path) -> Manifest:
    """The manifest of a checkpoint folder `save_quantized` wrote (its float model and scheme)."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "modelopt.pth").is_file() or not (ckpt_dir / "manifest.json").is_file():
        raise LowbitError(f"{ckpt_dir}: not a lowbit quantized checkpoint (needs modelopt.pth and manifest.json)")
    return Manifest.load(ckpt_dir / "manifest.json")


def load_quantized(ckpt_dir: str | Path, detector: Detector | None = None) -> tuple[torch.nn.Module, Manifest]:
    """Restore a ModelOpt checkpoint saved by `save_quantized` onto a fresh copy of its base model."""
    import modelopt.torch.opt as mto

    from lowbit.models.ultralytics import load_detector

    ckpt_dir = Path(ckpt_dir)
    manifest = checkpoint_manifest(ckpt_dir)
    detector = detector or load_detector(manifest.model, manifest.imgsz)
    net = copy.deepcopy(detector.net)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            net = mto.restore(net, str(ckpt_dir / "modelopt.pth"))
    except Exception as e:
        raise LowbitError(f"{ckpt_dir / 'modelopt.pth'}: cannot restore onto {manifest.model} ({e})") from None
    verify(net, manifest.layers)
    return net.eval(), manifest


