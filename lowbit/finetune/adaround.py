"""AdaRound: learned up/down rounding of integer weights, for block-wise reconstruction.

Why ours: ModelOpt has no AdaRound; its PTQ rounds to nearest (lowbit adds GPTQ), and its QAT moves the
float weights themselves. AdaRound keeps every weight within one grid step of its float value and learns
only which way to round, so a few hundred unlabelled images fit it without overfitting (Nagel et al.,
"Up or Down? Adaptive Rounding for Post-Training Quantization", ICML 2020; Li et al., "BRECQ", ICLR 2021).

Each twin stands in for a ModelOpt integer weight quantizer of one block while that block trains, with
the quantizer's own calibrated range and arithmetic (scale = (2^(b-1)-1) / amax), starting from the
float model's weight. At the end it writes the hard-rounded weight back, on ModelOpt's grid, and puts
ModelOpt's quantizer back, so the checkpoint and the ONNX export see an ordinary quantized model.
"""

from __future__ import annotations

import torch

GAMMA, ZETA = -0.1, 1.1  # the rectified sigmoid's stretch, as in the paper


def integer_weight_quantizers(module: torch.nn.Module):
    """(name, module, ModelOpt weight quantizer) for each enabled, calibrated integer weight quantizer
    with per-channel or per-tensor scales: the ones a learned twin can stand in for. FP8 weights round by
    their format and block-wise scales are ModelOpt's own; both are left alone."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    for name, mod in module.named_modules():
        wq = getattr(mod, "weight_quantizer", None)
        if (isinstance(wq, TensorQuantizer) and wq.is_enabled and not wq.block_sizes
                and isinstance(wq.num_bits, int) and wq.amax is not None):
            yield name, mod, wq


class AdaRoundWeight(torch.nn.Module):
    """`start` is the weight whose rounding the soft variables begin at (the float weight itself gives
    round-to-nearest; a GPTQ-rounded weight gives GPTQ's choices). Each weight may then end on either side
    of its float value: the grid point `start` rounds to, or its neighbour towards the float weight."""

    def __init__(self, float_weight: torch.Tensor, amax: torch.Tensor, bits: int, start: torch.Tensor | None = None,
                 learn_step: bool = False):
        super().__init__()
        self.qmax = 2 ** (bits - 1) - 1
        # a tensor numerator, as ModelOpt writes it (see _LsqWeight), so the grid is ModelOpt's
        scale = torch.tensor(float(self.qmax), device=amax.device) / amax.detach().float()
        x = float_weight.detach().float() * scale
        n = torch.round((x if start is None else start.detach().float() * scale))  # ModelOpt's rounding
        self.register_buffer("scale", scale)
        self.register_buffer("floor", torch.where(x >= n, n, n - 1))
        # h(V) = the float weight's place between floor and floor + 1, but on the side of `start`'s choice,
        # so the hard start is exactly `start` (half to even for the float weight: this model's weights lie
        # on an INT8 grid, so exact halves are common). A start that is not round-to-nearest (GPTQ's) keeps
        # a margin from 0.5: without it the regularizer's first push flips GPTQ's choices at random and the
        # model collapses.
        m = 1e-4 if start is None else 0.25
        rest = x - self.floor
        rest = torch.where(n > self.floor, rest.clamp(0.5 + m, 1 - 1e-4), rest.clamp(1e-4, 0.5 - m))
        self.v = torch.nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        # the integers stay on the grid chosen above; with learn_step their common step (per channel) learns
        # too, as a relative change, so a channel whose range was clipped too far or too little can recover
        self.log_step = torch.nn.Parameter(torch.zeros_like(scale)) if learn_step else None
        self.hard = False

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        up = (self.v >= 0).float() if self.hard else self.h()
        q = torch.clamp(self.floor + up, -self.qmax - 1, self.qmax) / self.scale
        return (q if self.log_step is None else q * self.log_step.exp()).to(w.dtype)

    def regularizer(self, beta: float) -> torch.Tensor:
        """Sum over weights of 1 - |2h - 1|^beta: 0 once every h is 0 or 1."""
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()


class AdaRoundBlock:
    """AdaRound twins for the integer-weight quantizers of one block, around `teacher_block`'s float
    weights. start="current" begins at the student's present rounding (GPTQ's, by default), "nearest" at
    round-to-nearest of the float weights, as in the paper. With learn_step, each quantizer's step (amax)
    learns as well and is written back into ModelOpt's quantizer."""

    def __init__(self, block: torch.nn.Module, teacher_block: torch.nn.Module, start: str = "current",
                 learn_step: bool = False):
        teacher = dict(teacher_block.named_modules())
        self.twins = []
        for name, mod, wq in integer_weight_quantizers(block):
            if name not in teacher:
                continue
            amax = wq.amax.reshape(-1, *[1] * (mod.weight.dim() - 1)) if wq.amax.numel() > 1 else wq.amax
            twin = AdaRoundWeight(teacher[name].weight.to(mod.weight.device), amax.to(mod.weight.device), wq.num_bits,
                                  mod.weight if start == "current" else None, learn_step)
            mod._modules["weight_quantizer"] = twin
            self.twins.append((mod, wq, twin))

    def parameters(self) -> list[torch.nn.Parameter]:
        return [twin.v for *_, twin in self.twins]

    def step_parameters(self) -> list[torch.nn.Parameter]:
        return [twin.log_step for *_, twin in self.twins if twin.log_step is not None]

    def regularizer(self, beta: float) -> torch.Tensor:
        n = sum(twin.v.numel() for *_, twin in self.twins)
        return sum(twin.regularizer(beta) for *_, twin in self.twins) / max(n, 1)

    def penalty(self, step: int, steps: int) -> torch.Tensor | float:
        """The regularizer at `step` of `steps`: none for the first 20%, so the rounding first fits freely,
        then beta annealed 20 -> 2 (the paper's schedule) to sharpen every rounding to up or down."""
        warm = steps // 5
        return 0.0 if step < warm else self.regularizer(20 - 18 * (step - warm) / max(1, steps - warm))

    def finish(self) -> None:
        """Hard rounding written into the weights; ModelOpt's quantizers back in place."""
        with torch.no_grad():
            for mod, wq, twin in self.twins:
                twin.hard = True
                mod.weight.data.copy_(twin(mod.weight))
                if twin.log_step is not None:
                    wq.amax = (wq.amax.float() * twin.log_step.exp().reshape(wq.amax.shape)).to(wq.amax.dtype)
                mod._modules["weight_quantizer"] = wq
