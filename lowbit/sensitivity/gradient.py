"""ModelOpt AutoQuantize scores (`method="gradient"`), driven by the detector's own training loss.

ModelOpt's gradient method needs a loss; `kl_div` assumes one logits tensor and scores every box-branch
layer 0 on a detector. We give it Ultralytics' detection loss, either against the labels
(`gradient`) or, label-free, against the float model's own confident detections (`gradient-selfsup`),
and read every layer's per-format score out of the search state rather than only its final choice.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings

import torch

from lowbit.data.loader import Batch
from lowbit.models.decode import decode
from lowbit.formats import Format
from lowbit.sensitivity.base import ScoreStore, SensitivityContext


def self_targets(net: torch.nn.Module, batch: Batch, nc: int, imgsz: int, conf: float = 0.25) -> dict:
    """The float model's own detections, in the label form the detection loss reads."""
    with torch.no_grad():
        out = net(batch.images.to(next(net.parameters()).device))
    preds = decode((out[0] if isinstance(out, (tuple, list)) else out).float().cpu(), nc, imgsz, conf=conf)
    idx, cls, boxes = [], [], []
    for i, p in enumerate(preds):
        xyxy = p[:, :4] / imgsz
        idx.append(torch.full((len(p),), float(i)))
        cls.append(p[:, 5:6])
        boxes.append(torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1))
    return {"batch_idx": torch.cat(idx), "cls": torch.cat(cls), "bboxes": torch.cat(boxes)}


def run_auto_quantize(ctx: SensitivityContext, self_supervised: bool, effective_bits: float,
                      checkpoint: str | None = None):
    """ModelOpt auto_quantize over ctx.formats with the detection loss; returns (model, search state)."""
    import modelopt.torch.quantization as mtq

    from lowbit.models.ultralytics import detection_loss
    from lowbit.quantize.apply import format_cfg

    det = ctx.detector
    dev = torch.device(ctx.device)
    net = copy.deepcopy(det.net).to(dev)
    for p in net.parameters():
        p.requires_grad_(True)
    criterion = detection_loss(net)
    data = []
    for b in ctx.batches:
        targets = self_targets(det.net.to(dev), b, det.nc, det.imgsz) if self_supervised else b.targets(det.imgsz)
        data.append({"img": b.images.to(dev), "batch_idx": targets["batch_idx"].to(dev),
                     "cls": targets["cls"].to(dev), "bboxes": targets["bboxes"].to(dev)})
    scored = {layer.name for layer in ctx.layers}
    disabled = [n for n, m in net.named_modules()
                if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and n not in scored]

    def loss_func(output, batch):
        return criterion(output, batch)[0].sum()

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "custom quantization formats" warning: expected, ours are custom
        model, state = mtq.auto_quantize(
            net, constraints={"effective_bits": effective_bits},
            quantization_formats=[format_cfg(f) for f in ctx.formats], data_loader=data,
            forward_step=lambda m, b: m(b["img"]), loss_func=loss_func, disabled_layers=disabled or None,
            num_calib_steps=len(data), num_score_steps=len(data), method="gradient", checkpoint=checkpoint)
    return model, state


def scores_from_state(state: dict, formats: list[Format]) -> dict[str, dict[str, float]]:
    """Per layer and format, the loss increase ModelOpt estimated (its 'no quantization' score is 0)."""
    names = {f"CUSTOM_{i}": f.name for i, f in enumerate(formats)}
    out: dict[str, dict[str, float]] = {}
    for stats in state["candidate_stats"].values():
        for recipe, score in zip(stats["formats"], stats["scores"]):
            fmt = names.get(str(recipe).split("(")[0])  # QuantRecipe prints as "CUSTOM_0(effective-bits: 4.0)"
            if fmt is None:
                continue
            for module in stats["module_names"]:
                out.setdefault(module, {})[fmt] = float(score)
    return out


def _gradient(ctx: SensitivityContext, store: ScoreStore, self_supervised: bool) -> None:
    if all(store.done(layer.name, f.name) for layer in ctx.layers for f in ctx.formats):
        return
    ckpt = ctx.options.get("autoquant_checkpoint")
    # Only the scores are wanted here; 16 bits is feasible whatever subset of layers is scored.
    _, state = run_auto_quantize(ctx, self_supervised, effective_bits=16.0, checkpoint=ckpt)
    table = scores_from_state(state, ctx.formats)
    for layer in ctx.layers:
        for f in ctx.formats:
            if layer.name in table and f.name in table[layer.name]:
                store.add(layer.name, f.name, table[layer.name][f.name])


def gradient(ctx: SensitivityContext, store: ScoreStore) -> None:
    _gradient(ctx, store, self_supervised=False)


def gradient_selfsup(ctx: SensitivityContext, store: ScoreStore) -> None:
    _gradient(ctx, store, self_supervised=True)



def modelopt_choice(ctx: SensitivityContext, effective_bits: float, checkpoint: str | None = None,
                    self_supervised: bool = False) -> dict[str, Format]:
    """ModelOpt auto_quantize's own per-layer choice at `effective_bits` (with a checkpoint, its
    calibration and scores are reused and only the solve reruns)."""
    _, state = run_auto_quantize(ctx, self_supervised, effective_bits, checkpoint)
    names = {f"CUSTOM_{i}": f for i, f in enumerate(ctx.formats)}
    out = {}
    for hparam, recipe in state["best"]["recipe"].items():
        fmt = names.get(str(recipe).split("(")[0])
        if fmt is None:
            continue
        for module in state["candidate_stats"][hparam]["module_names"]:
            out[module] = fmt
    return out
