"""COCO mAP with pycocotools, from any runner's raw output, with latency measured in the same pass."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
from pathlib import Path

import torch
from pydantic import BaseModel, Field

from lowbit.data.datasets import Dataset
from lowbit.data.loader import Batch, make_batches
from lowbit.errors import LowbitError
from lowbit.models.decode import decode
from lowbit.evaluate.latency import Latency
from lowbit.evaluate.runners import make_runner, timed
from lowbit.progress import track


class EvalResult(BaseModel):
    model: str
    runtime: str
    dataset: str
    images: int
    imgsz: int
    map50_95: float
    map50: float
    map_small: float
    map_medium: float
    map_large: float
    latency: Latency
    # COCO-format detections behind the scores, for paired comparisons (lowbit.evaluate.resampling); kept out
    # of results.json, written beside it by `lowbit eval`
    detections: list[dict] = Field(default_factory=list, exclude=True, repr=False)


def matched(coco_gt: dict, detections: list[dict]):
    """pycocotools' COCOeval of box detections (not empty) on every image of `coco_gt`, after `evaluate()`."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {k: coco_gt[k] for k in ("images", "annotations", "categories")}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(detections), "bbox")
        ev.params.imgIds = [im["id"] for im in coco_gt["images"]]
        ev.evaluate()
    return ev


def coco_map(coco_gt: dict, detections: list[dict]) -> dict[str, float]:
    keys = ("map50_95", "map50", "map75", "map_small", "map_medium", "map_large")
    if not detections:
        return dict.fromkeys(keys, 0.0)
    ev = matched(coco_gt, detections)
    with contextlib.redirect_stdout(io.StringIO()):
        ev.accumulate()
        ev.summarize()
    return {k: max(float(v), 0.0) for k, v in zip(keys, ev.stats[:6])}


def detections_to_coco(batch: Batch, preds: list[torch.Tensor], imgsz: int, cat_ids: dict[int, int]) -> list[dict]:
    """COCO-format detections of [n, 6] predictions (x1 y1 x2 y2 score class in input pixels), mapped back through
    each image's own resize and padding."""
    out = []
    for item, p in zip(batch.items, preds):
        if not len(p):
            continue
        p = p.cpu()
        boxes = item.to_original(p[:, :4].numpy())
        for (x1, y1, x2, y2), score, cls in zip(boxes, p[:, 4].tolist(), p[:, 5].tolist()):
            cid = cat_ids.get(int(cls))
            if cid is None:
                continue
            out.append({"image_id": item.record.image_id, "category_id": cid,
                        "bbox": [round(float(x1), 3), round(float(y1), 3), round(float(x2 - x1), 3),
                                 round(float(y2 - y1), 3)], "score": round(float(score), 5)})
    return out


DETECTIONS = "detections.json.gz"  # beside a result.json: what `lowbit compare` and a study's errors re-score


def save_detections(folder: str | Path, detections: list[dict]) -> Path:
    from lowbit.io import atomic_write_bytes

    return atomic_write_bytes(Path(folder) / DETECTIONS,
                              gzip.compress(json.dumps(detections, separators=(",", ":")).encode()))


def load_detections(folder: str | Path) -> list[dict] | None:
    """The detections saved in `folder`; None where there are none (results written before they were kept)."""
    path = Path(folder) / DETECTIONS
    if not path.is_file():
        return None
    try:
        return json.loads(gzip.decompress(path.read_bytes()))
    except (OSError, ValueError) as e:
        raise LowbitError(f"{path}: not readable ({e})") from None


def evaluate(model, dataset: Dataset, names: dict[int, str], imgsz: int = 640, batch_size: int = 1,
             device: str = "cpu", warmup: int = 3, batches: list[Batch] | None = None,
             progress: bool = True, model_name: str | None = None, threads: int | None = None,
             runtime: str | None = None, card=None) -> EvalResult:
    """mAP of a detector (torch module, Detector, .onnx path or OpenVINO IR) on a labelled dataset, plus latency,
    on `runtime` (lowbit.evaluate.runners; default: torch for a module, onnxruntime for an .onnx). `card`
    (lowbit.models.onnx_detector.ModelCard) says how a graph lowbit did not export is fed and decoded.

    Latency covers the model's forward only (no decode or NMS), per image, after `warmup` runs.
    """
    if not dataset.has_labels:
        raise LowbitError(f"{dataset.source}: evaluation needs labels (a COCO json or Ultralytics labels)")
    if imgsz <= 0:
        raise LowbitError(f"image size {imgsz}: must be positive")
    runner = make_runner(model, runtime, device=device, threads=threads)
    size = getattr(runner, "input_shape", [None])[-1]
    if isinstance(size, int) and size > 0 and size != imgsz:
        raise LowbitError(f"{model}: its input takes {size}x{size} images; evaluate it with --imgsz {size}")
    cat_ids = dataset.category_ids(names)
    if batches is None:
        batches = make_batches(dataset, imgsz, batch_size, progress=progress,
                               preprocess=card.preprocess if card is not None else None)
    runner.card = card
    if getattr(runner, "extra_inputs", None):  # refuse an undescribed input before any image runs
        from lowbit.models.onnx_detector import extra_feeds

        extra_feeds(card, runner.extra_inputs, None, imgsz, 1, str(model))
    if card is None:
        def detect(out):
            # a YOLO graph exported without Ultralytics' export mode also returns the head's feature maps
            return decode(out[0] if isinstance(out, tuple) else out, len(names), imgsz)
    else:
        from lowbit.models.onnx_detector import decode as decode_card

        def detect(out):
            return decode_card(out, card, len(names), imgsz)
    for _ in range(warmup):
        runner.chunks(batches[0].images, batches[0].items)
    dets, times = [], []
    for b in track(batches, f"evaluating {runner.name}", enabled=progress):
        outs, dt = timed(runner, b.images, b.items)
        if len(b.items) == batches[0].images.shape[0]:
            times.append(dt)
        preds = [p for out in outs for p in detect(out)]
        if card is not None and card.boxes == "original":
            from lowbit.models.onnx_detector import to_input_pixels

            preds = to_input_pixels(preds, b.items)
        dets.extend(detections_to_coco(b, preds, imgsz, cat_ids))
    stats = coco_map(dataset.coco, dets)
    lat = Latency.from_seconds(runner.name, batches[0].images.shape[0], times or [float("nan")])
    return EvalResult(model=model_name or str(getattr(model, "source", model)), runtime=runner.name,
                      dataset=dataset.source, images=len(dataset), imgsz=imgsz,
                      map50_95=stats["map50_95"], map50=stats["map50"], map_small=stats["map_small"],
                      map_medium=stats["map_medium"], map_large=stats["map_large"], latency=lat, detections=dets)


def mean_ap_only(model, dataset: Dataset, names: dict[int, str], batches: list[Batch], imgsz: int = 640,
                 device: str = "cpu") -> float:
    """mAP50-95 alone, for inner loops (ablation) that re-evaluate many variants on fixed batches."""
    runner = make_runner(model, device=device)
    cat_ids = dataset.category_ids(names)
    dets = []
    for b in batches:
        dets.extend(detections_to_coco(b, decode(runner(b.images), len(names), imgsz), imgsz, cat_ids))
    return coco_map(dataset.coco, dets)["map50_95"]


__all__ = ["DETECTIONS", "EvalResult", "coco_map", "evaluate", "load_detections", "matched", "mean_ap_only",
           "save_detections"]
