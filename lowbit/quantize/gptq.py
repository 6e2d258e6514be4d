"""GPTQ for convolutions: integer or FP8 weights whose rounding errors compensate each other.

Why ours: ModelOpt's `gptq` handles quantized linears only. A conv is a linear map on im2col patches,
so the same algorithm applies with H the patch Gram matrix (already collected for output-aware
clipping). The scale of each output channel stays what ModelOpt calibrated; only the values on the grid
change, so the updated weights lie on ModelOpt's grid and its fake quantization reproduces them. The grid
is INT4/INT8's uniform one or FP8 E4M3's (scale amax/448), where GPTQ matters more: E4M3's three mantissa
bits round a weight by up to 6%, coarser than per-channel INT8 for most of a channel's weights.
Reference: Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (2023), with activation ordering and dampening.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DAMP = 0.01


def patches(mod: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's inputs as the columns its weight multiplies: [groups, in/groups * kh * kw, positions]."""
    x = x.detach().float()
    if isinstance(mod, torch.nn.Conv2d):
        cols = F.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride)  # [B, Cin*k*k, L]
        g = mod.groups
        return cols.view(x.shape[0], g, -1, cols.shape[-1]).permute(1, 2, 0, 3).reshape(g, -1, x.shape[0] * cols.shape[-1])
    return x.reshape(-1, x.shape[-1]).T.unsqueeze(0)  # [1, in, N]


FP8_MAX = 448.0  # the largest E4M3 value; ModelOpt scales an FP8 tensor so that amax maps to it


def _quant(w: torch.Tensor, inv: torch.Tensor, scale: torch.Tensor, qmax: float, fp8: bool) -> torch.Tensor:
    if fp8:
        return torch.clamp(w * inv, -qmax, qmax).to(torch.float8_e4m3fn).to(w.dtype) * scale
    return torch.clamp(torch.round(w * inv), -qmax - 1, qmax) * scale


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 (per group), after dampening; dead inputs get a unit diagonal."""
    h = h.clone()
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    diag[diag <= 0] = 1.0
    base = torch.diag_embed(diag.mean(-1, keepdim=True).expand_as(diag).clone())
    for damp in (DAMP, 0.1, 1.0):  # escalate dampening until H is positive definite
        try:
            chol = torch.linalg.cholesky(h + damp * base)
            return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
        except RuntimeError:
            continue
    return torch.eye(h.shape[-1], dtype=h.dtype, device=h.device).expand_as(h).clone()  # plain rounding


def gptq_weight(weight: torch.Tensor, h: torch.Tensor, amax: torch.Tensor, bits: int, fp8: bool = False) -> torch.Tensor:
    """GPTQ-rounded copy of a conv/linear weight with fixed per-channel (or per-tensor) `amax`, on the grid of
    `bits`-bit integers or, with `fp8`, FP8 E4M3.

    `h` is [groups, K, K] with K = in_channels/groups * kh * kw."""
    out_ch, groups = weight.shape[0], h.shape[0]
    qmax = FP8_MAX if fp8 else 2 ** (bits - 1) - 1
    w = weight.detach().double().reshape(out_ch, -1).clone()
    amax = amax.detach().double().reshape(-1, 1).expand(out_ch, 1).clamp_min(1e-12)
    scale, inv = amax / qmax, qmax / amax
    h = h.double()
    perm = None
    if groups == 1:  # activation order: quantize the columns with the most input energy first
        perm = torch.argsort(torch.diagonal(h[0]), descending=True)
        w, h = w[:, perm], h[:, perm][:, :, perm]
    u = _inverse_cholesky(h)  # [groups, K, K]
    gidx = torch.arange(out_ch, device=w.device) // (out_ch // groups)
    q = torch.zeros_like(w)
    for i in range(w.shape[1]):
        col = w[:, i]
        qc = _quant(col, inv[:, 0], scale[:, 0], qmax, fp8)
        q[:, i] = qc
        row = u[0, i] if groups == 1 else u[gidx, i]  # [K] or [out, K]
        d = row[i] if groups == 1 else row[:, i]
        err = (col - qc) / d
        w[:, i + 1:] -= err[:, None] * (row[i + 1:][None, :] if groups == 1 else row[:, i + 1:])
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return q.reshape(weight.shape).to(weight.dtype)
