"""GPTQ layer by layer through the quantized network: each layer rounded on the inputs that the layers
rounded before it produce.

Why: `refine_weights` takes every layer's input statistics from the float network, so no layer sees the
error its quantized predecessors make. GPTQ as published rounds each layer on the quantized network's own
inputs X~ ("gptq-seq"). "gptaq" also aims at what the float network computes on its float inputs X:
min ||W X - Q X~||^2, which splits exactly into a least-squares term and GPTQ of W' = W X X~^T (X~ X~^T)^-1
on H = X~ X~^T, the asymmetric calibration of Li et al., "GPTAQ" (2025). W' is ridge-regularized towards W
with GPTQ's own dampening, so a direction the calibration images do not excite keeps its float weight.
"""

from __future__ import annotations

import torch

from lowbit.formats import Format
from lowbit.models.ultralytics import block_input
from lowbit.quantize.gptq import DAMP, gptq_weight
from lowbit.quantize.refine import patches


class _Inputs:
    """Forward hook that keeps the last input its layer saw."""

    def __init__(self):
        self.x: torch.Tensor | None = None

    def __call__(self, mod, inputs, output):
        self.x = inputs[0].detach()


def _corrected(weight: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """W' = W (C + l I)(H + l I)^-1 per group: the weight that best maps the quantized inputs to the float
    layer's float output, shrunk towards W where H is weak."""
    out_ch, groups, k = weight.shape[0], h.shape[0], h.shape[-1]
    w = weight.detach().double().reshape(groups, out_ch // groups, k)
    eye = torch.eye(k, dtype=h.dtype, device=h.device)
    lam = DAMP * torch.diagonal(h, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)[:, None, None]
    rhs = (c + lam * eye).transpose(1, 2) @ w.transpose(1, 2)  # [g, K, out/g]
    return torch.linalg.solve(h + lam * eye, rhs).transpose(1, 2).reshape(weight.shape).to(weight.dtype)


def _stats(s_layer, t_layer, s_block, t_block, ins_s, ins_t, with_float: bool):
    """Over all calibration batches, every patch counted: H = E[x~ x~^T] of a layer's quantized-network
    inputs, and with_float also C = E[x x~^T] and both means (float-network inputs x)."""
    hs, ht = _Inputs(), _Inputs()
    handles = [s_layer.register_forward_hook(hs)] + ([t_layer.register_forward_hook(ht)] if with_float else [])
    h = c = mu_s = mu_t = None
    n = 0
    try:
        for i in range(len(ins_s)):
            s_block(ins_s[i])
            ps = patches(s_layer, hs.x)
            h = _add(h, (ps @ ps.transpose(1, 2)).double())
            if with_float:
                t_block(ins_t[i])
                pt = patches(t_layer, ht.x)
                c = _add(c, (pt @ ps.transpose(1, 2)).double())
                mu_s, mu_t = _add(mu_s, ps.double().sum(-1)), _add(mu_t, pt.double().sum(-1))
            n += ps.shape[-1]
    finally:
        for handle in handles:
            handle.remove()
    if not with_float:
        return h / n, None, None, None
    return h / n, c / n, mu_s / n, mu_t / n


def _add(total, x):
    return x if total is None else total + x


def _bias_shift(w_float: torch.Tensor, w_q: torch.Tensor, mu_t: torch.Tensor, mu_s: torch.Tensor) -> torch.Tensor:
    """Per output channel, E[W x] - E[Q x~]: the mean by which the quantized layer misses the float one."""
    out_ch, groups = w_float.shape[0], mu_t.shape[0]
    wf = w_float.detach().double().reshape(groups, out_ch // groups, -1)
    wq = w_q.detach().double().reshape(groups, out_ch // groups, -1)
    return ((wf @ mu_t[..., None]) - (wq @ mu_s[..., None])).reshape(out_ch)


def refine_sequential(qnet: torch.nn.Module, float_net: torch.nn.Module, targets: dict[str, Format], calib_batches,
                      asymmetric: bool = False, bias_correction: bool = False) -> None:
    """GPTQ-round every layer in `targets` in network order, each on the quantized prefix's outputs.
    bias_correction then moves each channel's bias by the mean it misses the float layer's output by.

    Runs the Ultralytics network block by block on the calibration batches, keeping each block's outputs
    that later blocks read; within a block, layers are rounded in module order."""
    dev = next(qnet.parameters()).device
    s_blocks, t_blocks = list(qnet.model), list(float_net.model)
    keep = set(getattr(float_net, "save", []))
    xs = [b.images.to(dev) for b in calib_batches]
    xt = list(xs)
    ys_s: list[list] = [[] for _ in xs]
    ys_t: list[list] = [[] for _ in xs]
    with torch.no_grad():
        for k, (ms, mt) in enumerate(zip(s_blocks, t_blocks)):
            ins_s = [block_input(ms, xs[i], ys_s[i]) for i in range(len(xs))]
            ins_t = [block_input(mt, xt[i], ys_t[i]) for i in range(len(xs))]
            for name, s_layer in ms.named_modules(prefix=f"model.{k}"):
                fmt = targets.get(name)
                if fmt is None:
                    continue
                t_layer = float_net.get_submodule(name)
                h, c, mu_s, mu_t = _stats(s_layer, t_layer, ms, mt, ins_s, ins_t, asymmetric or bias_correction)
                w = t_layer.weight
                if asymmetric:
                    w = _corrected(w, h, c)
                amax = s_layer.weight_quantizer.amax.reshape(-1).to(w.device)
                q = gptq_weight(w, h, amax, int(fmt.weight.bits))
                s_layer.weight.data.copy_(q.to(s_layer.weight.device))
                if bias_correction and s_layer.bias is not None:
                    shift = _bias_shift(t_layer.weight, q, mu_t, mu_s)
                    s_layer.bias.data.add_(shift.to(s_layer.bias.dtype).to(s_layer.bias.device))
            for i in range(len(xs)):
                xs[i], xt[i] = ms(ins_s[i]), mt(ins_t[i])
                ys_s[i].append(xs[i] if k in keep else None)
                ys_t[i].append(xt[i] if k in keep else None)
