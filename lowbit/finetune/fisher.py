"""Label-free Fisher weights for block-wise reconstruction: how much each element of a block's output
matters to the detector's head, measured through the float network that follows the block.

Why ours: block-wise reconstruction (BRECQ, AdaRound) matches each block's output by plain MSE, which
spends the rounding budget evenly over every channel and pixel, while the detector reads a few of them
through the rest of the network. BRECQ weights the block error by the squared gradient of the task loss,
which needs labels. Here the loss is the distillation loss itself (lowbit.finetune.blockwise.head_loss):
at the teacher its gradient is zero, but its curvature is the Fisher information of the teacher's output
distribution (DFL bins per box side, Bernoulli per class). Random probes g with E[g g^T] = that
curvature give E[(J^T g)^2], with J the Jacobian of the head maps with respect to the block output: the
diagonal of the head loss's second-order expansion in that output, i.e. the weight per element that makes
the block's reconstruction error an estimate of the head-loss increase it causes. No labels are read;
ModelOpt has no block-wise reconstruction to plug this into.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def curvature_probe(t: dict, reg_max: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """A scalar whose gradient at the teacher's maps `t` is a random draw with covariance equal to head_loss's
    Hessian there (H = Fisher of the teacher's output distributions, scaled as head_loss scales each term).

    Each draw is H^(1/2) r with r standard normal: for a DFL distribution p, (diag(sqrt p) - p sqrt(p)^T) r
    has covariance diag(p) - p p^T; for a class probability, sqrt(p (1 - p)) r. (Sampling outputs from the
    teacher gives the same covariance, but rare events, a class of p = 0.001 drawn as present, make its
    squared gradients heavy-tailed: their relative variance grows as 1/p.)"""
    boxes, scores = t["boxes"].float(), t["scores"].float()
    b, _, a = boxes.shape
    logits = boxes.view(b, 4, reg_max, a)
    with torch.no_grad():
        p = F.softmax(logits, 2)
        r = torch.randn(p.shape, generator=gen, device=p.device)
        root = p.sqrt()
        v_box = root * r - p * (root * r).sum(2, keepdim=True)
        q = scores.sigmoid()
        w = q.amax(1)  # head_loss's per-anchor box weight
        v_box *= torch.sqrt(w / (4 * w.sum().clamp_min(1.0)))[:, None, None, :]
        v_cls = torch.sqrt(q * (1 - q) / q.sum().clamp_min(1.0)) * torch.randn(q.shape, generator=gen, device=q.device)
    return (logits * v_box).sum() + (scores * v_cls).sum()


def block_fisher(head_of: Callable[[torch.Tensor], dict], y: torch.Tensor, reg_max: int, samples: int,
                 gen: torch.Generator | None = None) -> torch.Tensor:
    """Diagonal Fisher weights (same shape as `y`) of the head loss with respect to one block's output `y`.

    `head_of(y)` runs the float network after the block and returns the head's raw maps (a generator,
    if given, lives on y's device); `samples` draws are averaged."""
    y = y.detach().requires_grad_(True)
    with torch.enable_grad():
        t = head_of(y)
        acc = torch.zeros_like(y)
        for s in range(samples):
            (g,) = torch.autograd.grad(curvature_probe(t, reg_max, gen), y, retain_graph=s < samples - 1)
            acc += g.detach() ** 2
    return acc / samples


def weighted_nmse(s: torch.Tensor, t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Fisher-weighted relative error: 0 when they agree, 1 for an output of zeros, as plain NMSE."""
    return (w * (s.float() - t.float()) ** 2).sum() / (w * t.float() ** 2).sum().clamp_min(1e-20)
