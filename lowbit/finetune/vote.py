"""Rounding vote: the per-weight majority of several rounding-only runs of one quantized model.

Why: AdaRound on a few hundred images is noisy. On YOLOv10n the batch order alone moved coco-val200 mAP
by a point, and no held-out selection could tell the runs apart (docs/results.md, section 7). Runs that
learn only rounding from the same start share every weight's floor and every scale, so each integer
weight is one of two codes in every run; the majority keeps what the runs agree on and averages out
what one sampling order made up. The result is an ordinary quantized model on ModelOpt's grid, exported
like any other. Neither ModelOpt nor the AdaRound/BRECQ reference code combines runs.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.finetune.adaround import integer_weight_quantizers


def _codes(mod: torch.nn.Module, wq) -> tuple[torch.Tensor, torch.Tensor]:
    amax = wq.amax.float()
    amax = amax.reshape(-1, *[1] * (mod.weight.dim() - 1)) if amax.numel() > 1 else amax
    # ModelOpt's arithmetic (a tensor numerator), so the codes are exactly the ones its fake quant produces
    scale = torch.tensor(float(2 ** (wq.num_bits - 1) - 1), device=amax.device) / amax
    return torch.round(mod.weight.detach().float() * scale), scale


def vote_rounding(nets: list[torch.nn.Module], names: list[str] | None = None) -> tuple[torch.nn.Module, dict]:
    """A copy of `nets[0]` whose integer weights are each the majority code of `nets` (an odd number of
    runs). Everything else (scales, float layers, biases) must be identical across the runs: a run that
    learned biases or scales, or trained weights end to end, has no common grid to vote on."""
    names = names or [f"run {i}" for i in range(len(nets))]
    if len(nets) < 3 or len(nets) % 2 == 0:
        raise LowbitError(f"a rounding vote needs an odd number of runs, at least 3 (got {len(nets)}): a tie has no majority")
    out = copy.deepcopy(nets[0])
    states = [n.state_dict() for n in nets]
    weights = {f"{name}.weight" for name, *_ in integer_weight_quantizers(out)}
    for key, ref in states[0].items():
        if key in weights or not isinstance(ref, torch.Tensor):
            continue
        for st, who in zip(states[1:], names[1:]):
            other = st.get(key)
            if other is None or other.shape != ref.shape or not torch.equal(other, ref):
                raise LowbitError(f"{who}: {key} differs from {names[0]}; a vote combines rounding-only runs of one "
                                  "start (AdaRound without learned biases or scales)")
    mods = [dict(n.named_modules()) for n in nets]
    changed = total = 0
    for name, mod, wq in integer_weight_quantizers(out):
        codes = torch.stack([_codes(m[name], m[name].weight_quantizer)[0] for m in mods])
        _, scale = _codes(mod, wq)
        if (codes.amax(0) - codes.amin(0)).max() > 1:
            raise LowbitError(f"layer {name}: the runs round some weight more than one step apart; they do not "
                              "share a start (vote runs of the same checkpoint, same --round-start)")
        vote = codes.median(0).values
        changed += int((vote != codes[0]).sum())
        total += vote.numel()
        with torch.no_grad():
            mod.weight.copy_((vote / scale).to(mod.weight.dtype))
    if not total:
        raise LowbitError(f"{names[0]}: no integer weights with per-channel or per-tensor scales to vote on")
    return out, {"runs": len(nets), "weights": total, "changed_from_first": changed}


def vote_checkpoints(checkpoints: list[str | Path], out: str | Path) -> dict:
    """`vote_rounding` over lowbit checkpoints; writes the voted checkpoint (manifest of the first, with
    the members recorded) to `out`."""
    from lowbit.models.ultralytics import load_detector
    from lowbit.quantize.apply import load_quantized, save_quantized

    if len(checkpoints) < 3 or len(checkpoints) % 2 == 0:
        raise LowbitError(f"a rounding vote needs an odd number of checkpoints, at least 3 (got {len(checkpoints)})")
    nets, det, manifest = [], None, None
    for c in checkpoints:
        net, m = load_quantized(c, det)
        if manifest is not None and m.layers != manifest.layers:
            raise LowbitError(f"{c}: its manifest assigns other formats than {checkpoints[0]}'s; a vote needs one scheme")
        det = det or load_detector(m.model, m.imgsz)
        manifest = manifest or m
        nets.append(net)
    net, stats = vote_rounding(nets, [str(c) for c in checkpoints])
    manifest = manifest.model_copy(update={"origin": {**manifest.origin, "vote": {
        "members": [str(c) for c in checkpoints], **stats}}})
    ckpt = save_quantized(net, manifest, out)
    return {"checkpoint": str(ckpt), **stats}
