"""Accuracy recovery past PTQ: block-wise AdaRound from the float model, on unlabelled images.

In network order, each top-level block of the quantized network learns to map the quantized prefix's output to
the float network's output of that block (BRECQ's block reconstruction); only the rounding direction of each
integer weight learns (lowbit.finetune.adaround), from the checkpoint's own rounding (GPTQ's), optionally with each
channel's step beside it. The block error is plain relative MSE, or its mean with the same error weighted element
by element by how much that element moves the detector's head (label-free Fisher weights, lowbit.finetune.fisher).
The head block matches the head maps themselves (`head_loss`).

Why ours: ModelOpt's QAT is "train the quantized model with your own loop" and has no AdaRound; Ultralytics'
trainer needs labels and trains in train mode, where YOLOv10 detaches the one-to-one head (the deployed one) from
the backbone. Here the model stays in eval mode; batch norm is folded at load, so no running statistics can drift.

The two recipes are the measured ones (docs/results.md, "Fine-tuning"): `w4` for uniform INT4 weights (learned
steps, MSE blocks, from a `--rounding gptq-seq` start), `mixed` for mixed INT4/INT8 schemes (MSE + Fisher blocks, from
a GPTQ start). End-to-end distillation, weight-training block reconstruction, end-to-end rounding, mosaics, flips,
learned biases and the other variants measured did not help and were removed (docs/notebook/).
"""

from __future__ import annotations

import math
import time
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field

from lowbit.errors import LowbitError
from lowbit.finetune.fisher import block_fisher, weighted_nmse
from lowbit.models.ultralytics import block_input, head_maps, reg_max


class AdaRoundConfig(BaseModel):
    """Block-wise AdaRound; the defaults are the `mixed` recipe."""

    block_steps: int = Field(500, ge=1)  # optimizer steps per block
    round_lr: float = 1e-2  # learning rate of the rounding variables
    round_weight: float = 0.01  # the push of each rounding to up or down, against the block's relative error
    batch: int = Field(16, ge=1)
    learn_steps: bool = False  # each integer weight channel's step learns beside the rounding
    step_lr: float = 1e-3  # its learning rate (a relative change per step)
    block_loss: Literal["mse", "mse+fisher"] = "mse+fisher"
    fisher_samples: int = Field(8, ge=1)  # random curvature probes averaged per image for the Fisher weights
    seed: int = 0  # batch order; on YOLOv10n it alone moves coco-val200 mAP by up to a point (docs/results.md)


RECIPES: dict[str, AdaRoundConfig] = {
    "mixed": AdaRoundConfig(),
    "w4": AdaRoundConfig(learn_steps=True, block_loss="mse"),
}


def get_recipe(name: str, override: AdaRoundConfig | None = None) -> AdaRoundConfig:
    """The named recipe's config, or `override` whole."""
    if override is not None:
        return override
    if name not in RECIPES:
        raise LowbitError(f"unknown fine-tuning recipe {name!r}; use one of {', '.join(RECIPES)}")
    return RECIPES[name]


class FinetuneResult(BaseModel):
    recipe: str = ""
    steps: int
    seconds: float
    device: str
    first_loss: float
    last_loss: float


def head_loss(s: dict, t: dict, reg_max: int) -> torch.Tensor:
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
    return box + cls


def _nmse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return ((s.float() - t.float()) ** 2).sum() / (t.float() ** 2).sum().clamp_min(1e-12)


def _schedule(opt, steps: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))


def finetune(student: torch.nn.Module, teacher: torch.nn.Module, batches, cfg: AdaRoundConfig,
             device: str = "cpu", progress: bool = True) -> FinetuneResult:
    """Fine-tune `student` (a ModelOpt fake-quant network) in place against `teacher` (its float source)."""
    from lowbit.finetune.adaround import integer_weight_quantizers

    if not batches:
        raise LowbitError("fine-tuning needs training images (none were given)")
    if not any(True for _ in integer_weight_quantizers(student)):
        raise LowbitError("the model has no calibrated integer weight quantizer to round")
    torch.manual_seed(cfg.seed)
    dev = torch.device(device)
    student.to(dev).eval()
    teacher.to(dev).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    t0 = time.perf_counter()
    steps, first, last = _blocks(student, teacher, batches, cfg, dev, progress)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    for p in student.parameters():
        p.requires_grad_(False)
    return FinetuneResult(steps=steps, seconds=time.perf_counter() - t0, device=device, first_loss=first,
                          last_loss=last)


def _meanhead_maps(v: list[float]) -> float:
    n = max(1, min(10, len(v) // 4))  # the first and last quarter (at most 10 steps) of the run
    return float(sum(v[:n]) / n)


def _mean_tail(v: list[float]) -> float:
    n = max(1, min(10, len(v) // 4))
    return float(sum(v[-n:]) / n)


def _blocks(student, teacher, batches, cfg: AdaRoundConfig, dev, progress) -> tuple[int, float, float]:
    """Per-block output matching. Each block's inputs come from the already-tuned quantized prefix (so a
    block also learns to absorb the error that reaches it); its target is the teacher's block output.
    Outputs are cached for every batch and only those a later block reads are kept (Ultralytics' `save`).
    The first 20% of a block's steps fit the rounding freely, then the push towards 0/1 sharpens (beta 20 -> 2,
    the paper's schedule) and the block is hard-rounded before the next one starts."""
    from lowbit.finetune.adaround import AdaRoundBlock
    from lowbit.progress import track

    s_blocks, t_blocks = list(student.model), list(teacher.model)
    keep = set(getattr(teacher, "save", [])) | {len(t_blocks) - 1}
    xs_s = [b.images.to(dev) for b in batches]  # current block inputs, per batch
    xs_t = list(xs_s)
    ys_s: list[list] = [[] for _ in batches]
    ys_t: list[list] = [[] for _ in batches]
    rmax = reg_max(teacher)
    gen = torch.Generator().manual_seed(cfg.seed)
    fisher_gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    total, first, last = 0, [], []
    for k in track(range(len(s_blocks)), f"block reconstruction ({len(s_blocks)} blocks)", enabled=progress):
        ms, mt = s_blocks[k], t_blocks[k]
        with torch.no_grad():
            ins = [block_input(ms, xs_s[i], ys_s[i]) for i in range(len(batches))]
            targets = [mt(block_input(mt, xs_t[i], ys_t[i])) for i in range(len(batches))]
        rounding = AdaRoundBlock(ms, mt, "current", cfg.learn_steps)
        if rounding.twins:
            weights = None
            if cfg.block_loss == "mse+fisher" and k < len(s_blocks) - 1:
                weights = [block_fisher(lambda y, i=i: head_maps(run_from(t_blocks, k, y, ys_t[i])), targets[i], rmax,
                                        cfg.fisher_samples, fisher_gen) for i in range(len(batches))]
            groups = [{"params": rounding.parameters(), "lr": cfg.round_lr}]
            if cfg.learn_steps:
                groups.append({"params": rounding.step_parameters(), "lr": cfg.step_lr})
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
                    loss = head_loss(head_maps(out), head_maps(targets[i]), rmax)
                elif weights is None:
                    loss = _nmse(out, targets[i])
                else:
                    loss = 0.5 * (_nmse(out, targets[i]) + weighted_nmse(out, targets[i], weights[i]))
                losses.append(loss.item())
                loss = loss + cfg.round_weight * rounding.penalty(step, cfg.block_steps)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            for p in params:
                p.requires_grad_(False)
            total += cfg.block_steps
            first.append(_meanhead_maps(losses))
            last.append(_mean_tail(losses))
        rounding.finish()
        with torch.no_grad():
            for i in range(len(batches)):
                xs_s[i] = ms(ins[i])
                xs_t[i] = targets[i]
                ys_s[i].append(xs_s[i] if k in keep else None)
                ys_t[i].append(xs_t[i] if k in keep else None)
    return total, float(sum(first)), float(sum(last))


def run_from(blocks, k: int, y: torch.Tensor, ys_before: list):
    """The output of the last of `blocks` when block k's output is `y` (earlier outputs from `ys_before`)."""
    ys = list(ys_before) + [y]
    for m in blocks[k + 1:]:
        y = m(block_input(m, y, ys))
        ys.append(y)
    return y
