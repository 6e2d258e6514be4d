"""Label-free output distortion: quantize one layer, measure how far the raw head maps move.

Measured on the head's raw maps (DFL box logits and class logits for every anchor) before any box
selection: distortion of the final 300 boxes hides what matters (keeping the top layers of such a
ranking at INT8 plateaued at -5.7 mAP points on YOLOv10n).
"""

from __future__ import annotations

import torch

from lowbit.sensitivity.base import PrefixCache, ScoreStore, SensitivityContext, probes


def _head_maps(out) -> tuple[torch.Tensor, torch.Tensor]:
    from lowbit.models.ultralytics import head_maps

    preds = head_maps(out)
    return preds["boxes"].float(), preds["scores"].float()


def _nmse(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(((out - ref) ** 2).sum() / (ref ** 2).sum().clamp_min(1e-12))


def distortion(ctx: SensitivityContext, store: ScoreStore) -> None:
    dev = torch.device(ctx.device)
    net = ctx.detector.net.to(dev)
    cache = PrefixCache(net, [b.images.to(dev) for b in ctx.batches])
    refs = [_head_maps(ys[-1]) for ys in cache.outputs]
    for fmt, layer, probe in probes(ctx, store, "distortion"):
        box_err = cls_err = 0.0
        with probe.only(layer.name) as qnet, torch.no_grad():
            for i, (rb, rc) in enumerate(refs):
                ob, oc = _head_maps(cache.run_from(qnet, PrefixCache.block_of(layer.name), i))
                box_err += _nmse(rb, ob)
                cls_err += _nmse(rc, oc)
        n = len(ctx.batches)
        # Both branches count: the class branch alone misses box-branch damage and vice versa.
        store.add(layer.name, fmt.name, (box_err + cls_err) / (2 * n), box_nmse=box_err / n, cls_nmse=cls_err / n)
