"""How far apart two models' COCO mAP really are: paired resampling of the evaluation images.

Why ours: pycocotools scores one fixed set of images. A few hundred images put every mAP on a noise floor
(on coco-val200 one fine-tuning recipe spans half a point between seeds), so a difference between schemes
means little without its standard error. Every model is scored on the same random halves of the images
(the delete-half jackknife: the spread of half-sample estimates is the full sample's standard error, Shao
and Wu 1989), so the error of a difference leaves out what the images share (hard scenes are hard for all).

Halves, not the bootstrap: a bootstrap draws images with replacement, and an image drawn twice doubles its
true positives of a rare category while false positives from many images average out, which inflates rare
categories' AP (on coco-val200 the bootstrap's mean mAP sat well above the full set's own). A half leaves every image's detections as they are: its score is exactly
pycocotools' on that subset.

COCO's own matching runs once per model (`COCOeval.evaluate`); each half then redoes only what
`COCOeval.accumulate` does for area "all" and 100 detections per image, on the images kept. Tested against
pycocotools on the same subsets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lowbit.errors import LowbitError

REC_THRS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)  # COCO's 101 points


@dataclass
class _Category:
    image: np.ndarray  # (D,) image index of each detection, in score order (COCO's stable sort)
    tp: np.ndarray  # (T, D) matched and not ignored, per IoU threshold
    fp: np.ndarray  # (T, D) unmatched and not ignored
    gts: np.ndarray  # (I,) non-ignored ground truths per image (int)


@dataclass
class ImageEvals:
    """One model's COCO matching on a dataset, per category and image, ready to re-accumulate."""

    image_ids: list[int]
    categories: list[_Category]

    def map(self, keep: np.ndarray | None = None) -> tuple[float, float]:
        """(mAP50-95, mAP50) on the images where `keep` is true (all by default); COCO's accumulate."""
        keep = np.ones(len(self.image_ids), bool) if keep is None else np.asarray(keep, bool)
        per_cat = [c for c in (_precision(cat, keep) for cat in self.categories) if c is not None]
        if not per_cat:
            return 0.0, 0.0
        p = np.stack(per_cat)  # (K, T, R)
        return float(p.mean()), float(p[:, 0].mean())


def _precision(cat: _Category, keep: np.ndarray) -> np.ndarray | None:
    """(T, R) interpolated precision at COCO's recall points; None where COCO leaves the category out."""
    npig = int(cat.gts[keep].sum())
    if npig == 0:
        return None
    kept = keep[cat.image]
    tp = np.cumsum(cat.tp[:, kept], axis=1, dtype=float)
    fp = np.cumsum(cat.fp[:, kept], axis=1, dtype=float)
    out = np.zeros((tp.shape[0], len(REC_THRS)))
    if tp.shape[1] == 0:
        return out
    rc = tp / npig
    pr = tp / (fp + tp + np.spacing(1))
    pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]  # COCO's precision envelope
    for t in range(tp.shape[0]):
        idx = np.searchsorted(rc[t], REC_THRS, side="left")
        ok = idx < rc.shape[1]  # recall points never reached keep precision 0
        out[t, ok] = pr[t, idx[ok]]
    return out


def image_evals(coco_gt: dict, detections: list[dict]) -> ImageEvals:
    """COCO's per-image matching (area "all", up to 100 detections per image) of one model's detections."""
    from lowbit.evaluate.coco import matched

    ids = [im["id"] for im in coco_gt["images"]]
    if not detections:
        return ImageEvals(image_ids=ids, categories=[])
    ev = matched(coco_gt, detections)
    p = ev.params
    n_img, n_area, max_det = len(p.imgIds), len(p.areaRng), p.maxDets[-1]
    cats = []
    for k in range(len(p.catIds)):
        evals = [ev.evalImgs[k * n_area * n_img + i] for i in range(n_img)]
        present = [(i, e) for i, e in enumerate(evals) if e is not None]  # area "all" comes first
        if not present:
            continue
        scores = np.concatenate([e["dtScores"][:max_det] for _, e in present])
        order = np.argsort(-scores, kind="mergesort")
        image = np.concatenate([np.full(len(e["dtScores"][:max_det]), i) for i, e in present])[order]
        hit = np.concatenate([e["dtMatches"][:, :max_det] for _, e in present], axis=1)[:, order]
        ignored = np.concatenate([e["dtIgnore"][:, :max_det] for _, e in present], axis=1)[:, order]
        gts = np.zeros(n_img, int)
        for i, e in present:
            gts[i] = np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)
        cats.append(_Category(image=image.astype(int), tp=(hit != 0) & ~(ignored != 0),
                              fp=(hit == 0) & ~(ignored != 0), gts=gts))
    return ImageEvals(image_ids=ids, categories=cats)


def paired_halves(evals: list[ImageEvals], replicates: int = 500, seed: int = 0,
                  progress: bool = False) -> np.ndarray:
    """(replicates, models) mAP50-95 of every model on the same random halves of the images."""
    from lowbit.progress import track

    n = len(evals[0].image_ids)
    if any(e.image_ids != evals[0].image_ids for e in evals):
        raise LowbitError("a paired comparison needs every model scored on the same images")
    if n < 4:
        raise LowbitError(f"{n} images are too few to estimate how much their choice moves mAP")
    rng = np.random.default_rng(seed)
    out = np.empty((replicates, len(evals)))
    for r in track(range(replicates), f"scoring {len(evals)} models on {replicates} halves of {n} images",
                   enabled=progress):
        keep = np.zeros(n, bool)
        keep[rng.choice(n, n // 2, replace=False)] = True
        out[r] = [e.map(keep)[0] for e in evals]
    return out


def standard_errors(halves: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """From `paired_halves`' scores: each model's standard error (the spread of its half-sample scores is the
    full sample's), and that of its difference from the first model, scored on the same halves."""
    return halves.std(axis=0, ddof=1), (halves - halves[:, :1]).std(axis=0, ddof=1)


__all__ = ["ImageEvals", "REC_THRS", "image_evals", "paired_halves", "standard_errors"]
