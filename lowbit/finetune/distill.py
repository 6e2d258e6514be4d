"""Accuracy recovery past PTQ: the float model teaches its fake-quantized copy, on unlabelled images.

Two strategies, measured against each other in docs/results.md:
- "distill": end to end. Every conv weight and bias of the quantized network learns, through ModelOpt's
  straight-through fake quant, to reproduce the teacher's raw head maps (DFL box distributions by KL,
  class logits by BCE against the teacher's probabilities), optionally also the neck features the head
  reads, and the detection loss on labels when they exist.
- "blocks": block-wise reconstruction (BRECQ's per-block output matching): in network order, each
  top-level block learns to map the quantized prefix's output to the teacher's output of that block; the
  head block matches the head maps with the same loss as "distill". Weights and biases learn.
- "adaround": the same block-wise reconstruction, but only the rounding direction of each integer weight
  learns (lowbit.finetune.adaround), from the float weights; FP8 weights stay, biases learn with
  `round_bias`.
- "adaround-global": AdaRound's variables of every integer weight at once, learned end to end through the
  head loss, with "distill"'s augmentation: block-wise rounding sees only its block's output error, while
  the deployed error is the head's; rounding-only learning keeps each weight within a grid step of its
  float value, which end-to-end weight training on a few hundred images did not (it overfit).

Why ours: ModelOpt's QAT is "train the quantized model with your own loop"; Ultralytics' trainer needs
labels and trains in train mode, where YOLOv10 detaches the one-to-one head (the deployed one) from the
backbone. Here the model stays in eval mode, so the deployed head's error reaches every layer; batch
norm is folded at load, so no running statistics can drift.

Scales: ModelOpt's integer fake quant passes no gradient to amax (its LSQ covers only static block
scales), so `learn_scales` swaps each integer weight quantizer for a learned-step-size (LSQ) twin during
training ("distill", "blocks"), or lets AdaRound's twin learn its step beside the rounding ("adaround*"),
and writes the learned amax back into ModelOpt's quantizer at the end.
"""

from __future__ import annotations

import math
import time
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field

from lowbit.data.loader import Batch
from lowbit.errors import LowbitError
from lowbit.finetune.fisher import block_fisher, weighted_nmse
from lowbit.models.ultralytics import block_input


class FinetuneConfig(BaseModel):
    mode: Literal["distill", "blocks", "adaround", "adaround-global"] = "distill"
    epochs: int = 8  # passes over the calibration images ("distill", "adaround-global")
    block_steps: int = 200  # optimizer steps per block ("blocks", "adaround")
    lr: float = 1e-5  # weights and biases ("distill", "blocks")
    round_lr: float = 1e-3  # AdaRound's rounding variables
    round_weight: float = 0.01  # AdaRound's push of each rounding to 0 or 1, against the block's relative error
    # AdaRound's first rounding: "current" = the checkpoint's own (GPTQ's, by default), "nearest" = the paper's
    round_start: Literal["current", "nearest"] = "current"
    round_bias: bool = False  # "adaround", "adaround-global": biases learn too (at lr), for the mean shift rounding leaves
    batch: int = 8
    # integer weight scales learn: LSQ ("distill", "blocks"), or the step of AdaRound's fixed integers ("adaround*");
    # activation scales stay as calibrated
    learn_scales: bool = False
    # "blocks", "adaround": what each block's output error is measured by. "mse": plain relative error;
    # "fisher": each element weighted by its label-free Fisher weight, i.e. by how much it moves the head loss
    # through the float network after the block (lowbit.finetune.fisher); "mse+fisher": the mean of both
    block_loss: Literal["mse", "fisher", "mse+fisher"] = "mse"
    fisher_samples: int = Field(8, ge=1)  # random curvature probes averaged per image for the Fisher weights
    feature_weight: float = 0.0  # normalized MSE on the neck features the head reads
    label_weight: float = 0.0  # Ultralytics' detection loss on labels, when the images have them
    # Label-free augmentation: the teacher sees the same altered image, so any change of the input is a new
    # training example. 160 images overfit within a few hundred steps without it.
    flip: bool = True  # horizontal flips ("distill", "adaround-global")
    flip_copies: bool = False  # "blocks", "adaround": reconstruct on a flipped copy of every image too
    scale_jitter: float = 0.0  # zoom by a factor in [1 - j, 1 + j], randomly placed, gray (114) padding
    color_jitter: float = 0.0  # brightness and contrast by a factor in [1 - j, 1 + j]
    # that many extra training images (every mode), each a 2x2 mosaic of four random training images at 0.5-1x
    # their scale: the teacher labels them, so a few hundred photos give new scenes, not only altered copies
    mosaic: int = 0
    seed: int = 0


class FinetuneResult(BaseModel):
    mode: str
    steps: int
    seconds: float
    device: str
    first_loss: float
    last_loss: float


def _head(out) -> dict:
    preds = out[1] if isinstance(out, (tuple, list)) else out
    if not isinstance(preds, dict) or "boxes" not in preds:
        raise LowbitError("fine-tuning needs an Ultralytics detection head that returns raw 'boxes' and 'scores' maps")
    return preds


def head_loss(s: dict, t: dict, reg_max: int, feature_weight: float = 0.0) -> torch.Tensor:
    """Distance of the student's raw head maps from the teacher's; 0 when they agree.

    Box: KL of each side's DFL distribution, weighted by the teacher's confidence at that anchor (the
    thousands of background anchors would otherwise drown the few that become detections).
    Class: BCE against the teacher's probabilities minus the teacher's own entropy, per unit of teacher
    probability mass, the normalization of Ultralytics' own class loss."""
    b, _, a = t["boxes"].shape
    t_log = F.log_softmax(t["boxes"].float().view(b, 4, reg_max, a), 2)
    s_log = F.log_softmax(s["boxes"].float().view(b, 4, reg_max, a), 2)
    kl = (t_log.exp() * (t_log - s_log)).sum(2).mean(1)  # [B, A]
    t_prob = t["scores"].float().sigmoid()
    w = t_prob.amax(1)
    box = (w * kl).sum() / w.sum().clamp_min(1.0)
    cls = (F.binary_cross_entropy_with_logits(s["scores"].float(), t_prob, reduction="sum")
           - F.binary_cross_entropy_with_logits(t["scores"].float(), t_prob, reduction="sum")) / t_prob.sum().clamp_min(1.0)
    loss = box + cls
    if feature_weight:
        loss = loss + feature_weight * sum(_nmse(fs, ft) for fs, ft in zip(s["feats"], t["feats"])) / len(t["feats"])
    return loss


def _nmse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return ((s.float() - t.float()) ** 2).sum() / (t.float() ** 2).sum().clamp_min(1e-12)


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _LsqWeight(torch.nn.Module):
    """Weight fake quant with a learned per-channel (or per-tensor) range, computed exactly as ModelOpt's
    INT fake quant (scale = (2^(b-1)-1) / amax, round, clamp to [-2^(b-1), 2^(b-1)-1], divide), so an
    untrained twin is bit-identical. The range learns as amax0 * exp(delta): under Adam the learning rate
    is then a relative change, the same for every layer."""

    def __init__(self, amax: torch.Tensor, bits: int):
        super().__init__()
        self.qmax = 2 ** (bits - 1) - 1
        self.register_buffer("amax0", amax.detach().float().clone())
        self.delta = torch.nn.Parameter(torch.zeros_like(self.amax0))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        # a tensor numerator, as ModelOpt writes it: `7 / t` is computed as 7 * (1 / t), which rounds
        # differently, and this model's weights sit on a grid where that flips exact halves
        scale = torch.tensor(float(self.qmax), device=w.device) / (self.amax0 * self.delta.exp())
        return torch.clamp(_RoundSTE.apply(w.float() * scale), -self.qmax - 1, self.qmax).div(scale).to(w.dtype)

    def amax(self) -> torch.Tensor:
        return self.amax0 * self.delta.detach().exp()


class _LearnedScales:
    """Stand LSQ twins in for ModelOpt's integer weight quantizers while training; put ModelOpt's back,
    with the learned ranges, at the end. (Swapping the quantizer child, not parametrizing the weight:
    ModelOpt serves `weight` through its own dynamic attribute, which a parametrization would unhook.)"""

    def __init__(self, net: torch.nn.Module):
        from lowbit.finetune.adaround import integer_weight_quantizers

        self.swapped = []
        for name, mod, wq in integer_weight_quantizers(net):
            lsq = _LsqWeight(wq.amax, wq.num_bits)
            mod._modules["weight_quantizer"] = lsq
            self.swapped.append((name, mod, wq, lsq))

    def parameters(self) -> list[torch.nn.Parameter]:
        return [lsq.delta for *_, lsq in self.swapped]

    def finish(self) -> None:
        for _, mod, wq, lsq in self.swapped:
            wq.amax = lsq.amax().reshape(wq.amax.shape).to(wq.amax.dtype)
            mod._modules["weight_quantizer"] = wq


def _trainable(module: torch.nn.Module, biases_only: bool = False) -> list[torch.nn.Parameter]:
    """Conv/linear weights and biases; the DFL conv is a fixed decoder and never learns."""
    from lowbit.models.ultralytics import ALWAYS_FLOAT_SUFFIXES

    out = []
    for name, mod in module.named_modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)) and not f".{name}".endswith(ALWAYS_FLOAT_SUFFIXES):
            out += [p for p in ((mod.bias,) if biases_only else (mod.weight, mod.bias)) if p is not None]
    return out


def _schedule(opt, steps: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))


def finetune(student: torch.nn.Module, teacher: torch.nn.Module, batches, cfg: FinetuneConfig,
             device: str = "cpu", progress: bool = True) -> FinetuneResult:
    """Fine-tune `student` (a ModelOpt fake-quant network) in place against `teacher` (its float source)."""
    if not batches:
        raise LowbitError("fine-tuning needs calibration images (none were given)")
    if cfg.block_loss != "mse" and cfg.mode not in ("blocks", "adaround"):
        raise LowbitError(f"block_loss {cfg.block_loss!r} weighs block outputs: it needs mode blocks or adaround, not {cfg.mode}")
    if cfg.mosaic and cfg.label_weight:
        raise LowbitError("mosaic images have no labels: use mosaic or label_weight, not both")
    torch.manual_seed(cfg.seed)
    if cfg.mosaic:
        batches = list(batches) + mosaic_batches(batches, cfg.mosaic, cfg.batch, cfg.seed)
    dev = torch.device(device)
    student.to(dev).eval()
    teacher.to(dev).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    t0 = time.perf_counter()
    run = {"distill": _distill, "blocks": _blocks, "adaround": _blocks, "adaround-global": _global_rounding}[cfg.mode]
    steps, first, last = run(student, teacher, batches, cfg, dev, progress)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    for p in student.parameters():
        p.requires_grad_(False)
    return FinetuneResult(mode=cfg.mode, steps=steps, seconds=time.perf_counter() - t0, device=device,
                          first_loss=first, last_loss=last)


def _label_criterion(net):
    from ultralytics.cfg import get_cfg
    from ultralytics.utils.loss import v8DetectionLoss

    args = getattr(net, "args", None)
    net.args = get_cfg()  # the loss reads its gains (box, cls, dfl) from here
    criterion = v8DetectionLoss(net)
    net.args = args
    return criterion


def _distill(student, teacher, batches, cfg: FinetuneConfig, dev, progress) -> tuple[int, float, float]:
    from lowbit.progress import track

    scales = _LearnedScales(student) if cfg.learn_scales else None
    params = _trainable(student)
    for p in params:
        p.requires_grad_(True)
    groups = [{"params": params}] + ([{"params": scales.parameters()}] if scales else [])
    opt = torch.optim.Adam(groups, lr=cfg.lr)
    steps = cfg.epochs * len(batches)
    sched = _schedule(opt, steps)
    reg_max = teacher.model[-1].reg_max
    criterion = _label_criterion(student) if cfg.label_weight else None
    gen = torch.Generator().manual_seed(cfg.seed)
    losses = []
    try:
        for step in track(range(steps), f"distill ({cfg.epochs} epochs)", enabled=progress):
            b = batches[step % len(batches)]
            x, flip = _augment(b.images.to(dev), cfg, gen, labels=criterion is not None)
            with torch.no_grad():
                t = _head(teacher(x))
            loss = head_loss(_head(out := student(x)), t, reg_max, cfg.feature_weight)
            if criterion is not None:
                targets = b.targets(x.shape[-1])
                if flip:
                    targets["bboxes"][:, 0] = 1 - targets["bboxes"][:, 0]
                batch = {k: v.to(dev) for k, v in targets.items()}
                loss = loss + cfg.label_weight * criterion(out, batch)[0].sum() / x.shape[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
    finally:
        if scales:
            scales.finish()
    return steps, _mean_head(losses), _mean_tail(losses)


def _global_rounding(student, teacher, batches, cfg: FinetuneConfig, dev, progress) -> tuple[int, float, float]:
    """AdaRound end to end: every integer weight's rounding variables (and biases, with `round_bias`) learn
    the head loss on augmented images; the push of each rounding to up or down starts after the first 20%
    of the steps and sharpens as in the block-wise version, then every weight is hard-rounded."""
    from lowbit.finetune.adaround import AdaRoundBlock
    from lowbit.progress import track

    rounding = AdaRoundBlock(student, teacher, cfg.round_start, cfg.learn_scales)
    if not rounding.twins:
        raise LowbitError("adaround-global: the model has no calibrated integer weight quantizer to round")
    groups = _rounding_groups(rounding, student, cfg)
    params = [p for g in groups for p in g["params"]]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(groups)
    steps = cfg.epochs * len(batches)
    sched = _schedule(opt, steps)
    reg_max = teacher.model[-1].reg_max
    gen = torch.Generator().manual_seed(cfg.seed)
    losses = []
    try:
        for step in track(range(steps), f"global rounding ({cfg.epochs} epochs)", enabled=progress):
            x, _ = _augment(batches[step % len(batches)].images.to(dev), cfg, gen, labels=False)
            with torch.no_grad():
                t = _head(teacher(x))
            loss = head_loss(_head(student(x)), t, reg_max, cfg.feature_weight)
            losses.append(loss.item())
            loss = loss + cfg.round_weight * rounding.penalty(step, steps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    finally:
        for p in params:
            p.requires_grad_(False)
        rounding.finish()
    return steps, _mean_head(losses), _mean_tail(losses)


def _rounding_groups(rounding, module: torch.nn.Module, cfg: FinetuneConfig) -> list[dict]:
    """Optimizer groups of AdaRound's rounding variables and, as configured, the module's biases and the
    twins' steps."""
    groups = [{"params": rounding.parameters(), "lr": cfg.round_lr}]
    if cfg.round_bias:
        groups.append({"params": _trainable(module, biases_only=True), "lr": cfg.lr})
    if cfg.learn_scales:
        groups.append({"params": rounding.step_parameters(), "lr": cfg.lr})
    return groups


def mosaic_batches(batches, n: int, batch_size: int, seed: int = 0) -> list[Batch]:
    """`n` new images in batches of `batch_size`: each quadrant is a random square crop of a random training
    image (side 0.5-1x the image's), resized to the quadrant, so objects keep 0.5-1x their size. (Ultralytics'
    mosaic lives in its labelled training dataset; here no label is moved, so a few lines on tensors do.)"""
    pool = torch.cat([b.images for b in batches])
    size = pool.shape[-1]
    half = size // 2
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(n, *pool.shape[1:], dtype=pool.dtype, device=pool.device)
    for i in range(n):
        for r, c in ((0, 0), (0, 1), (1, 0), (1, 1)):
            src = pool[int(torch.randint(len(pool), (), generator=gen))]
            side = int(torch.randint(half, size + 1, (), generator=gen))
            y, x = (int(torch.randint(size - side + 1, (), generator=gen)) for _ in range(2))
            out[i, :, r * half:(r + 1) * half, c * half:(c + 1) * half] = F.interpolate(
                src[None, :, y:y + side, x:x + side], size=(half, half), mode="bilinear", align_corners=False)[0]
    return [Batch(out[s:s + batch_size], []) for s in range(0, n, batch_size)]


def _augment(x: torch.Tensor, cfg: FinetuneConfig, gen: torch.Generator, labels: bool) -> tuple[torch.Tensor, bool]:
    """(augmented batch, whether it was flipped). The teacher sees the same image, so no label is needed;
    with labels only flips are allowed, since they are the only change whose boxes are moved here."""
    flip = cfg.flip and bool(torch.rand((), generator=gen) < 0.5)
    if flip:
        x = x.flip(-1)
    if cfg.scale_jitter or cfg.color_jitter:
        if labels:
            raise LowbitError("label_weight > 0 allows flips only (zoom would move the labelled boxes)")
        x = _jitter(x, cfg.scale_jitter, cfg.color_jitter, gen)
    return x, flip


def _jitter(x: torch.Tensor, scale: float, color: float, gen: torch.Generator) -> torch.Tensor:
    """Per image: zoom in or out about a random point, then brightness and contrast."""
    out = torch.full_like(x, 114 / 255)
    size = x.shape[-1]
    for i in range(x.shape[0]):
        img = x[i:i + 1]
        if scale:
            s = 1 + scale * (2 * float(torch.rand((), generator=gen)) - 1)
            n = max(8, int(round(size * s)))
            img = F.interpolate(img, size=(n, n), mode="bilinear", align_corners=False)
            off = int(torch.randint(abs(n - size) + 1, (), generator=gen))
            off2 = int(torch.randint(abs(n - size) + 1, (), generator=gen))
            if n >= size:
                img = img[..., off:off + size, off2:off2 + size]
            else:
                out[i, :, off:off + n, off2:off2 + n] = img[0]
                img = out[i:i + 1]
        if color:
            b = 1 + color * (2 * float(torch.rand((), generator=gen)) - 1)
            c = 1 + color * (2 * float(torch.rand((), generator=gen)) - 1)
            mean = img.mean()
            img = ((img - mean) * c + mean * b).clamp(0, 1)
        out[i] = img[0]
    return out


def _mean_head(v: list[float]) -> float:
    n = max(1, min(10, len(v) // 4))  # the first and last quarter (at most 10 steps) of the run
    return float(sum(v[:n]) / n)


def _mean_tail(v: list[float]) -> float:
    n = max(1, min(10, len(v) // 4))
    return float(sum(v[-n:]) / n)


def _blocks(student, teacher, batches, cfg: FinetuneConfig, dev, progress) -> tuple[int, float, float]:
    """Per-block output matching. Each block's inputs come from the already-tuned quantized prefix (so a
    block also learns to absorb the error that reaches it); its target is the teacher's block output.
    Outputs are cached for every batch and only those a later block reads are kept (Ultralytics' `save`).
    With AdaRound, the first 20% of a block's steps fit the rounding freely, then the push towards 0/1
    sharpens (beta 20 -> 2, the paper's schedule) and the block is hard-rounded before the next one starts."""
    from lowbit.finetune.adaround import AdaRoundBlock
    from lowbit.progress import track

    s_blocks, t_blocks = list(student.model), list(teacher.model)
    keep = set(getattr(teacher, "save", [])) | {len(t_blocks) - 1}
    xs_s = [b.images.to(dev) for b in batches]  # current block inputs, per batch
    if cfg.flip_copies:
        xs_s += [x.flip(-1) for x in xs_s]
        batches = list(batches) * 2
    xs_t = list(xs_s)
    ys_s: list[list] = [[] for _ in batches]
    ys_t: list[list] = [[] for _ in batches]
    reg_max = teacher.model[-1].reg_max
    scales = _LearnedScales(student) if cfg.learn_scales and cfg.mode == "blocks" else None
    gen = torch.Generator().manual_seed(cfg.seed)
    fisher_gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    total, first, last = 0, [], []
    try:
        for k in track(range(len(s_blocks)), f"block reconstruction ({len(s_blocks)} blocks)", enabled=progress):
            ms, mt = s_blocks[k], t_blocks[k]
            with torch.no_grad():
                ins = [block_input(ms, xs_s[i], ys_s[i]) for i in range(len(batches))]
                targets = [mt(block_input(mt, xs_t[i], ys_t[i])) for i in range(len(batches))]
            weights = None
            if cfg.block_loss != "mse" and k < len(s_blocks) - 1 and any(_is_quantized(m) for m in ms.modules()):
                weights = [block_fisher(lambda y, i=i: _head(_run_from(t_blocks, k, y, ys_t[i])), targets[i], reg_max,
                                        cfg.fisher_samples, fisher_gen) for i in range(len(batches))]
            rounding = AdaRoundBlock(ms, mt, cfg.round_start, cfg.learn_scales) if cfg.mode == "adaround" else None
            params = rounding.parameters() if rounding else _trainable(ms)
            step_params = [lsq.delta for name, *_, lsq in scales.swapped
                           if name.startswith(f"model.{k}.")] if scales else []
            if any(_is_quantized(m) for m in ms.modules()) and params:
                groups = _rounding_groups(rounding, ms, cfg) if rounding else [{"params": params, "lr": cfg.lr}]
                if step_params:
                    groups.append({"params": step_params, "lr": cfg.lr})
                params = [p for g in groups for p in g["params"]]
                for p in params:
                    p.requires_grad_(True)
                opt = torch.optim.Adam(groups)
                sched = _schedule(opt, cfg.block_steps)
                losses = []
                for step in range(cfg.block_steps):
                    i = int(torch.randint(len(batches), (), generator=gen))
                    out = ms(ins[i])
                    if k == len(s_blocks) - 1:
                        loss = head_loss(_head(out), _head(targets[i]), reg_max)
                    elif weights is None:
                        loss = _nmse(out, targets[i])
                    elif cfg.block_loss == "fisher":
                        loss = weighted_nmse(out, targets[i], weights[i])
                    else:
                        loss = 0.5 * (_nmse(out, targets[i]) + weighted_nmse(out, targets[i], weights[i]))
                    losses.append(loss.item())
                    if rounding:
                        loss = loss + cfg.round_weight * rounding.penalty(step, cfg.block_steps)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                for p in params:
                    p.requires_grad_(False)
                total += cfg.block_steps
                first.append(_mean_head(losses))
                last.append(_mean_tail(losses))
            if rounding:
                rounding.finish()
            with torch.no_grad():
                for i in range(len(batches)):
                    xs_s[i] = ms(ins[i])
                    xs_t[i] = targets[i]
                    ys_s[i].append(xs_s[i] if k in keep else None)
                    ys_t[i].append(xs_t[i] if k in keep else None)
    finally:
        if scales:
            scales.finish()
    return total, float(sum(first)), float(sum(last))


def _run_from(blocks, k: int, y: torch.Tensor, ys_before: list):
    """The output of the last of `blocks` when block k's output is `y` (earlier outputs from `ys_before`)."""
    ys = list(ys_before) + [y]
    for m in blocks[k + 1:]:
        y = m(block_input(m, y, ys))
        ys.append(y)
    return y


def _is_quantized(mod: torch.nn.Module) -> bool:
    from modelopt.torch.quantization.nn import TensorQuantizer

    from lowbit.finetune.adaround import AdaRoundWeight

    if isinstance(mod, TensorQuantizer):
        return mod.is_enabled
    return isinstance(mod, (_LsqWeight, AdaRoundWeight))
