"""Ultralytics detectors: load a `.pt` or build a `.yaml`, and enumerate quantizable layers."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.models.layers import LayerInfo

# Layers that must never be quantized. The DFL conv is a fixed arange that decodes box
# distributions; quantizing it alone costs YOLOv10n ~17 mAP points, and a loss-based method
# scores it 0 because it sits outside the loss graph.
ALWAYS_FLOAT_SUFFIXES = (".dfl.conv",)


@dataclass
class Detector:
    """A loaded detector: the torch module plus what lowbit needs to know about it."""

    net: torch.nn.Module
    source: str
    names: dict[int, str]
    imgsz: int = 640
    meta: dict = field(default_factory=dict)

    @property
    def nc(self) -> int:
        return len(self.names)

    def layers(self) -> list[LayerInfo]:
        return list_layers(self.net, self.imgsz)

    def quantizable_layers(self) -> list[LayerInfo]:
        return [layer for layer in self.layers() if layer.quantizable]


def _role(name: str, head_prefix: str | None) -> str:
    if head_prefix and name.startswith(head_prefix + "."):
        rest = name[len(head_prefix) + 1:]
        if rest.startswith(("cv2", "one2one_cv2")):
            return "head-box"
        if rest.startswith(("cv3", "one2one_cv3")):
            return "head-cls"
        if rest.startswith("dfl"):
            return "head-dfl"
        return "head"
    return "body"


def _head_prefix(net: torch.nn.Module) -> str | None:
    inner = getattr(net, "model", None)
    if isinstance(inner, torch.nn.Sequential) and len(inner):
        return f"model.{len(inner) - 1}"
    return None


def list_layers(net: torch.nn.Module, imgsz: int = 640) -> list[LayerInfo]:
    """Every Conv2d/Linear in network order, with parameter count and MACs at `imgsz`."""
    targets = {n: m for n, m in net.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    out_numel: dict[str, int] = {}
    reads_image: set[str] = set()
    hooks = []
    dev = next(net.parameters()).device
    image = torch.zeros(1, 3, imgsz, imgsz, device=dev)

    def record(name):
        def hook(mod, inp, out):
            out_numel.setdefault(name, out[0].numel())
            if inp and inp[0] is image:
                reads_image.add(name)
        return hook

    for name, mod in targets.items():
        hooks.append(mod.register_forward_hook(record(name)))
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(image)
    finally:
        for h in hooks:
            h.remove()
        net.train(was_training)
    head = _head_prefix(net)
    layers = []
    for name, mod in targets.items():
        w = mod.weight
        per_output = w[0].numel()  # MACs per output element: (in/groups) * kh * kw, or in_features
        layers.append(LayerInfo(
            name=name,
            type=type(mod).__name__.replace("Quant", ""),
            weight_shape=list(w.shape),
            params=w.numel() + (mod.bias.numel() if mod.bias is not None else 0),
            macs=out_numel.get(name, 0) * per_output,
            role=_role(name, head),
            quantizable=not name.endswith(ALWAYS_FLOAT_SUFFIXES) and name in out_numel,
            reads_image=name in reads_image,
        ))
    return layers


def block_input(block: torch.nn.Module, x, outputs: list):
    """What an Ultralytics block reads: the previous output `x`, or earlier blocks' `outputs` (its `f`),
    as DetectionModel._predict_once routes them; for code that runs a network block by block."""
    if block.f == -1:
        return x
    return outputs[block.f] if isinstance(block.f, int) else [x if j == -1 else outputs[j] for j in block.f]


def head_maps(out) -> dict:
    """The raw maps of an Ultralytics detection head from its eval-mode output: {"boxes": DFL logits [B, 4*reg_max,
    A], "scores": class logits [B, nc, A], ...}, what distillation and distortion compare."""
    preds = out[1] if isinstance(out, (tuple, list)) else out
    if not isinstance(preds, dict) or "boxes" not in preds or "scores" not in preds:
        raise LowbitError("this needs an Ultralytics detection head that returns raw 'boxes' and 'scores' maps")
    return preds


def detection_loss(net: torch.nn.Module):
    """Ultralytics' detection loss for `net` (it returns [box, cls, dfl] * batch size: sum it for a scalar). The
    loss reads its gains from `net.args`, which a loaded checkpoint holds as a plain dict: the defaults are set
    while it is built and the model's own args put back."""
    from ultralytics.cfg import get_cfg
    from ultralytics.utils.loss import v8DetectionLoss

    args = getattr(net, "args", None)
    net.args = get_cfg()
    try:
        return v8DetectionLoss(net)
    finally:
        net.args = args


def reg_max(net: torch.nn.Module) -> int:
    """DFL bins per box side of an Ultralytics detection head."""
    return int(net.model[-1].reg_max)


def _prepare(net: torch.nn.Module) -> torch.nn.Module:
    net = net.float().eval()
    for mod in net.modules():
        # In-place SiLU breaks ModelOpt's backward hooks ("a view ... modified inplace").
        if hasattr(mod, "inplace") and isinstance(mod.inplace, bool):
            mod.inplace = False
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def load_detector(source: str | Path, imgsz: int = 640) -> Detector:
    """Load an Ultralytics checkpoint (`.pt`) or build a model from an Ultralytics yaml.

    A yaml name such as `yolov10m.yaml` resolves to Ultralytics' packaged configs; the model gets
    random weights (for structure, size and speed work). Either way batch norm is folded as in deployment.
    """
    from ultralytics import YOLO

    src = str(source)
    path = Path(src)
    if path.suffix in (".yaml", ".yml"):
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                yolo = YOLO(src)
                yolo.model.fuse(verbose=False)
        except FileNotFoundError:
            raise LowbitError(f"{src}: model yaml not found (neither a file nor an Ultralytics config)") from None
        except Exception as e:  # Ultralytics raises many types for a malformed yaml
            raise LowbitError(f"{src}: cannot build a model from this yaml ({type(e).__name__}: {e})") from None
    elif path.suffix == ".pt":
        if not path.is_file():
            raise LowbitError(f"{src}: model file not found")
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                yolo = YOLO(str(path))
                # As deployed: batch norm folded into the convs (so quantization and fine-tuning see the
                # deployed weights and no BN statistics can drift) and YOLOv10's one-to-many head dropped.
                # A checkpoint that is already fused is left as it is.
                yolo.model.fuse(verbose=False)
        except Exception as e:
            raise LowbitError(f"{src}: not a loadable Ultralytics checkpoint ({type(e).__name__}: {e})") from None
    else:
        raise LowbitError(f"{src}: expected an Ultralytics .pt checkpoint or a .yaml model config")
    if yolo.task != "detect":
        raise LowbitError(f"{src}: a {yolo.task} model; lowbit handles detection models")
    stride = int(max(getattr(yolo.model, "stride", [32])))
    if imgsz <= 0 or imgsz % stride:
        raise LowbitError(f"{src}: image size {imgsz} must be a positive multiple of the model's stride {stride}")
    net = _prepare(yolo.model)
    names = {int(k): v for k, v in dict(yolo.model.names).items()}
    return Detector(net=net, source=src, names=names, imgsz=imgsz,
                    meta={"end2end": bool(getattr(net.model[-1], "end2end", False))})
