"""Ground truth: quantize one layer alone, measure the mAP50-95 drop on labelled scoring images.

Expensive (one COCO evaluation per layer and format), so it resumes from its score store.
"""

from __future__ import annotations

from lowbit.evaluate.coco import mean_ap_only
from lowbit.sensitivity.base import ScoreStore, SensitivityContext, probes


def _dataset_of(ctx: SensitivityContext):
    from lowbit.data.datasets import Dataset

    images = [it.record for b in ctx.batches for it in b.items]
    ds = ctx.options["dataset"]
    ids = {r.image_id for r in images}
    coco = dict(ds.coco)
    coco["images"] = [im for im in ds.coco["images"] if im["id"] in ids]
    coco["annotations"] = [a for a in ds.coco["annotations"] if a["image_id"] in ids]
    return Dataset(ds.name, images, ds.names, coco, ds.source)


def ablation(ctx: SensitivityContext, store: ScoreStore) -> None:
    det = ctx.detector
    ds = _dataset_of(ctx)
    base = mean_ap_only(det.net, ds, det.names, ctx.batches, det.imgsz, ctx.device)
    for fmt, layer, probe in probes(ctx, store, "ablation"):
        with probe.only(layer.name) as qnet:
            m = mean_ap_only(qnet, ds, det.names, ctx.batches, det.imgsz, ctx.device)
        store.add(layer.name, fmt.name, (base - m) * 100, map50_95=m, base_map50_95=base)
