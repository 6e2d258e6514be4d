"""Letterbox preprocessing (Ultralytics' own `LetterBox`) and re-iterable batches.

Batches are a plain list, not Ultralytics' InfiniteDataLoader: ModelOpt's calibration and scoring
passes must see the same images every time they iterate.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from lowbit.data.datasets import Dataset, ImageRecord
from lowbit.errors import LowbitError


@dataclass
class Letterboxed:
    image: np.ndarray  # uint8 CHW RGB, imgsz x imgsz
    record: ImageRecord
    orig_shape: tuple[int, int]  # (h, w)


def letterbox_geometry(orig_shape: tuple[int, int], imgsz: int) -> tuple[float, float, float]:
    """(gain, pad_x, pad_y) exactly as Ultralytics' LetterBox (centered) and scale_boxes compute them."""
    h, w = orig_shape
    gain = min(imgsz / h, imgsz / w)
    pad_x = round((imgsz - round(w * gain)) / 2 - 0.1)
    pad_y = round((imgsz - round(h * gain)) / 2 - 0.1)
    return gain, pad_x, pad_y


def letterbox(record: ImageRecord, imgsz: int) -> Letterboxed:
    from ultralytics.data.augment import LetterBox

    img = cv2.imread(str(record.path))
    if img is None:
        raise LowbitError(f"{record.path}: cannot read image")
    out = LetterBox(new_shape=(imgsz, imgsz), auto=False, scaleup=True)(image=img)
    chw = np.ascontiguousarray(out[..., ::-1].transpose(2, 0, 1))
    return Letterboxed(chw, record, img.shape[:2])


@dataclass
class Batch:
    images: torch.Tensor  # float32 [B,3,S,S] in 0..1
    items: list[Letterboxed]

    def targets(self, imgsz: int) -> dict[str, torch.Tensor]:
        """Labels in the form Ultralytics' detection loss reads: batch_idx, cls, normalized xywh."""
        idx, cls, boxes = [], [], []
        for i, it in enumerate(self.items):
            b = it.record.boxes
            if not len(b):
                continue
            gain, px, py = letterbox_geometry(it.orig_shape, imgsz)
            xyxy = b[:, 1:5] * gain + np.array([px, py, px, py], np.float32)
            xywh = np.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2,
                             xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]], 1) / imgsz
            idx.append(np.full(len(b), i, np.float32))
            cls.append(b[:, :1])
            boxes.append(xywh)
        if not idx:
            return {"batch_idx": torch.zeros(0), "cls": torch.zeros(0, 1), "bboxes": torch.zeros(0, 4)}
        return {"batch_idx": torch.from_numpy(np.concatenate(idx)),
                "cls": torch.from_numpy(np.concatenate(cls)),
                "bboxes": torch.from_numpy(np.concatenate(boxes).astype(np.float32))}


def make_batches(dataset: Dataset, imgsz: int = 640, batch_size: int = 8, progress: bool = False) -> list[Batch]:
    """Decode and letterbox every image once; batches hold float tensors ready for the model."""
    from lowbit.progress import track

    items = [letterbox(r, imgsz) for r in track(dataset.images, "loading images", enabled=progress)]
    batches = []
    for s in range(0, len(items), batch_size):
        chunk = items[s:s + batch_size]
        x = torch.from_numpy(np.stack([c.image for c in chunk])).float() / 255.0
        batches.append(Batch(x, chunk))
    return batches
