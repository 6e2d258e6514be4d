"""GPTQ layer by layer through the quantized network: each layer rounded on the inputs that the layers
rounded before it produce ("gptq-seq").

Why: `refine_weights` takes every layer's input statistics from the float network, so no layer sees the
error its quantized predecessors make; GPTQ as published rounds each layer on the quantized network's own
inputs. On YOLOv10n it helps uniform INT4 and leaves mixed schemes unchanged (docs/results.md, fine-tuning
INT4 schemes), so it is an option, not the default. Aiming at the float network's output instead (GPTAQ's
asymmetric target, or a bias correction) lost on both and was removed (docs/notebook/).
"""

from __future__ import annotations

import torch

from lowbit.formats import Format
from lowbit.models.ultralytics import block_input
from lowbit.quantize.gptq import gptq_weight, patches


class _Inputs:
    """Forward hook that keeps the last input its layer saw."""

    def __init__(self):
        self.x: torch.Tensor | None = None

    def __call__(self, mod, inputs, output):
        self.x = inputs[0].detach()


def _gram(layer, block, block_inputs) -> torch.Tensor:
    """E[x x^T] of a layer's input patches over all calibration batches, every patch counted."""
    seen = _Inputs()
    handle = layer.register_forward_hook(seen)
    h, n = None, 0
    try:
        for x in block_inputs:
            block(x)
            p = patches(layer, seen.x)
            hb = (p @ p.transpose(1, 2)).double()
            h = hb if h is None else h + hb
            n += p.shape[-1]
    finally:
        handle.remove()
    return h / n


def refine_sequential(qnet: torch.nn.Module, float_net: torch.nn.Module, targets: dict[str, Format], calib_batches) -> None:
    """GPTQ-round every layer in `targets` in network order, each on the quantized prefix's outputs.

    Runs the Ultralytics network block by block on the calibration batches, keeping each block's outputs
    that later blocks read; within a block, layers are rounded in module order. The float weights come
    from `float_net`, so a layer is rounded once, from its float values."""
    dev = next(qnet.parameters()).device
    keep = set(getattr(float_net, "save", []))
    xs = [b.images.to(dev) for b in calib_batches]
    ys: list[list] = [[] for _ in xs]
    with torch.no_grad():
        for k, block in enumerate(qnet.model):
            ins = [block_input(block, xs[i], ys[i]) for i in range(len(xs))]
            for name, layer in block.named_modules(prefix=f"model.{k}"):
                fmt = targets.get(name)
                if fmt is None:
                    continue
                w = float_net.get_submodule(name).weight
                amax = layer.weight_quantizer.amax.reshape(-1).to(w.device)
                q = gptq_weight(w, _gram(layer, block, ins), amax, int(fmt.weight.bits))
                layer.weight.data.copy_(q.to(layer.weight.device))
            for i in range(len(xs)):
                xs[i] = block(ins[i])
                ys[i].append(xs[i] if k in keep else None)
