"""Does a runtime compute what the graph means? Its outputs against a reference runtime's, on real images.

Two yardsticks, because the largest raw difference is the wrong one for a detector: an end-to-end head's top-300
list reorders when two scores swap in the last digit, so element-wise differences of hundreds of pixels come from a
correct runtime (OpenVINO's BF16 default on a float graph), while a runtime that mis-computes a Q/DQ graph moves
every box.
- Confident detections matched (same class, IoU >= 0.5): a correct runtime keeps nearly all of them (BF16 and INT8
  kernels round differently, so not all), a broken one few. It judges wherever the reference finds enough objects.
- The relative error of the raw outputs, where they are aligned anchor by anchor (every layout but end-to-end):
  it also judges a model with few confident detections (random weights, a test).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel

from lowbit.models.decode import decode

# Below this share of matched detections a runtime is reported as diverging, and its timing as failing: correct
# runtimes sit well above it and the mis-computed graphs far below (docs/results.md, "Correct on every runtime")
MIN_AGREEMENT = 0.8
MAX_RELATIVE_ERROR = 0.05
MIN_DETECTIONS = 20  # confident reference detections below which matching them says little
CONF = 0.25


class Parity(BaseModel):
    runtime: str
    reference: str
    images: int
    agreement: float  # 2 * matched / (reference detections + runtime detections), confident ones only
    reference_detections: int
    mean_iou: float  # of the matched pairs
    relative_error: float | None  # ||out - ref|| / ||ref|| of anchor-aligned raw outputs; None for end-to-end heads
    max_abs: float  # largest raw-output difference, for the record (not a verdict: see the module doc)

    @property
    def ok(self) -> bool:
        if self.relative_error is not None and self.relative_error > MAX_RELATIVE_ERROR:
            return False
        return self.agreement >= MIN_AGREEMENT or self.reference_detections < MIN_DETECTIONS

    @property
    def note(self) -> str:
        verdict = "outputs agree" if self.ok else "DIVERGES"
        rel = "" if self.relative_error is None else f", raw outputs within {self.relative_error:.1%}"
        return (f"{verdict} with {self.reference} on {self.images} images: {self.agreement:.0%} of "
                f"{self.reference_detections} confident detections matched (mean IoU {self.mean_iou:.2f}){rel}")


def _match(a: torch.Tensor, b: torch.Tensor) -> tuple[int, float]:
    """Greedy one-to-one matches of [n, 6] detections (x1 y1 x2 y2 score class), same class and IoU >= 0.5."""
    from torchvision.ops import box_iou

    if not len(a) or not len(b):
        return 0, 0.0
    iou = box_iou(a[:, :4], b[:, :4])
    iou[a[:, 5:6] != b[:, 5].unsqueeze(0)] = 0
    matched, total = 0, 0.0
    while True:
        v, idx = iou.flatten().max(0)
        if v < 0.5:
            break
        i, j = divmod(int(idx), iou.shape[1])
        matched, total = matched + 1, total + float(v)
        iou[i, :] = 0
        iou[:, j] = 0
    return matched, total


def check(reference, runner, batches, nc: int, imgsz: int, card=None) -> Parity:
    """Detections of `runner` against `reference` (runners of lowbit.evaluate.runners) on `batches`' images;
    `card` (lowbit.models.onnx_detector.ModelCard) reads a graph lowbit did not export."""
    if card is None:
        def detect(out):
            return decode(out, nc, imgsz, conf=CONF)
    else:
        from lowbit.models.onnx_detector import decode as decode_card

        def detect(out):
            return [p[p[:, 4] >= CONF] for p in decode_card(out, card, nc, imgsz)]

    matched, iou_sum, n_ref, n_run, max_abs, images = 0, 0.0, 0, 0, 0.0, 0
    err, norm, aligned = 0.0, 0.0, True
    for b in batches:
        outs_a, outs_b = reference.chunks(b.images), runner.chunks(b.images)
        pa = [p for o in outs_a for p in detect(o)]
        pb = [p for o in outs_b for p in detect(o)]
        for ra, rb in zip(outs_a, outs_b):
            ra, rb = (ra[0], rb[0]) if isinstance(ra, tuple) else (ra, rb)
            if ra.shape == rb.shape:
                max_abs = max(max_abs, float((ra - rb).abs().max()))
                err, norm = err + float(((ra - rb) ** 2).sum()), norm + float((ra ** 2).sum())
            aligned = aligned and ra.shape == rb.shape and ra.ndim == 3 and _aligned(ra, nc)
        for da, db in zip(pa, pb):
            m, s = _match(da, db)
            matched, iou_sum, n_ref, n_run = matched + m, iou_sum + s, n_ref + len(da), n_run + len(db)
        images += len(b.images)
    agreement = 1.0 if n_ref + n_run == 0 else 2 * matched / (n_ref + n_run)
    return Parity(runtime=runner.name, reference=reference.name, images=images, agreement=agreement,
                  reference_detections=n_ref, mean_iou=iou_sum / matched if matched else 0.0, max_abs=max_abs,
                  relative_error=(err / max(norm, 1e-30)) ** 0.5 if aligned else None)


def _aligned(out, nc: int) -> bool:
    """Raw outputs compared element by element only where anchors keep their place (not a top-k list)."""
    from lowbit.models.decode import layout_of

    try:
        return layout_of(out, nc) != "end2end"
    except Exception:  # another family's layout: anchor-aligned unless it is a short list of detections
        return out.shape[-1] != 6
