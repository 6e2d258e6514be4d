"""Preprocessing (Ultralytics' letterbox by default, or what a model card says) and re-iterable batches.

Batches are a plain list, not Ultralytics' InfiniteDataLoader: ModelOpt's calibration and scoring
passes must see the same images every time they iterate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import torch
from pydantic import BaseModel, Field

from lowbit.data.datasets import Dataset, ImageRecord
from lowbit.errors import LowbitError


class Preprocess(BaseModel):
    """What a detector expects of an image: the input tensor is (pixel[color order] * scale - mean) / std, at the
    graph's input size, resized as `resize` says. The default is Ultralytics' (RGB, 0-1, centred letterbox)."""

    color: Literal["rgb", "bgr"] = "rgb"
    scale: float = 1 / 255
    mean: list[float] = Field(default_factory=lambda: [0.0, 0.0, 0.0])
    std: list[float] = Field(default_factory=lambda: [1.0, 1.0, 1.0])
    # letterbox: aspect kept, centred, padded; letterbox-corner: aspect kept, image in the top-left corner (YOLOX);
    # stretch: resized to the square, aspect not kept
    resize: Literal["letterbox", "letterbox-corner", "stretch"] = "letterbox"
    pad: int = 114
    # OpenCV's interpolation for letterbox-corner and stretch (PaddleDetection resizes with cubic); letterbox is
    # Ultralytics' own, bilinear
    interp: Literal["linear", "cubic", "area"] = "linear"

    @property
    def is_default(self) -> bool:
        return self == Preprocess()


# named presets for `--preprocess`; any field can also be set as key=value
PREPROCESS_PRESETS = {
    "ultralytics": Preprocess(),
    "yolox": Preprocess(color="bgr", scale=1.0, resize="letterbox-corner"),
    "torchvision": Preprocess(resize="stretch"),  # its graphs normalize inside
    "imagenet": Preprocess(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    # PaddleDetection's eval reader (PP-PicoDet, PP-YOLOE): RGB, stretched with cubic interpolation, ImageNet stats
    "paddle": Preprocess(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], resize="stretch", interp="cubic"),
}


def parse_preprocess(spec: str | Preprocess | None) -> Preprocess:
    """A preset name, `key=value` pairs separated by commas (lists with `/`: mean=0.485/0.456/0.406), or both:
    `yolox,pad=0`."""
    if spec is None or isinstance(spec, Preprocess):
        return spec or Preprocess()
    out = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if "=" not in part:
            if part not in PREPROCESS_PRESETS:
                raise LowbitError(f"unknown preprocessing {part!r}: use a preset ({', '.join(PREPROCESS_PRESETS)}) or "
                                  f"key=value with keys {', '.join(Preprocess.model_fields)}")
            out.update(PREPROCESS_PRESETS[part].model_dump())
            continue
        key, value = (x.strip() for x in part.split("=", 1))
        if key not in Preprocess.model_fields:
            raise LowbitError(f"unknown preprocessing key {key!r}; keys: {', '.join(Preprocess.model_fields)}")
        out[key] = [float(v) for v in value.split("/")] if key in ("mean", "std") else value
    from pydantic import ValidationError

    try:
        return Preprocess.model_validate(out)
    except ValidationError as e:
        raise LowbitError(f"preprocessing {spec!r}: {e.errors()[0]['msg']}") from None


@dataclass
class Letterboxed:
    image: np.ndarray  # uint8 CHW in the model's color order, imgsz x imgsz
    record: ImageRecord
    orig_shape: tuple[int, int]  # (h, w)
    gain: tuple[float, float] = (1.0, 1.0)  # input pixels per original pixel, (x, y)
    offset: tuple[float, float] = (0.0, 0.0)  # padding before the image, (x, y), in input pixels

    def to_original(self, boxes: np.ndarray) -> np.ndarray:
        """x1 y1 x2 y2 boxes in input pixels -> original image pixels, clipped to the image."""
        b = boxes.astype(np.float64).copy()
        b[:, [0, 2]] = (b[:, [0, 2]] - self.offset[0]) / self.gain[0]
        b[:, [1, 3]] = (b[:, [1, 3]] - self.offset[1]) / self.gain[1]
        h, w = self.orig_shape
        b[:, [0, 2]] = b[:, [0, 2]].clip(0, w)
        b[:, [1, 3]] = b[:, [1, 3]].clip(0, h)
        return b


def letterbox_geometry(orig_shape: tuple[int, int], imgsz: int) -> tuple[float, float, float]:
    """(gain, pad_x, pad_y) exactly as Ultralytics' LetterBox (centered) and scale_boxes compute them."""
    h, w = orig_shape
    gain = min(imgsz / h, imgsz / w)
    pad_x = round((imgsz - round(w * gain)) / 2 - 0.1)
    pad_y = round((imgsz - round(h * gain)) / 2 - 0.1)
    return gain, pad_x, pad_y


def truncated_jpeg(path) -> bool:
    """A JPEG file cut short: it does not end with the end-of-image marker (FF D9), padding aside."""
    if str(path).lower().rsplit(".", 1)[-1] not in ("jpg", "jpeg"):
        return False
    with open(path, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - 64))
        tail = f.read()
    return not tail.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")


_INTERP = {"linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC, "area": cv2.INTER_AREA}


def letterbox(record: ImageRecord, imgsz: int, pre: Preprocess | None = None) -> Letterboxed:
    pre = pre or Preprocess()
    if truncated_jpeg(record.path):  # libjpeg decodes what is there, grey below, and only warns on stderr
        raise LowbitError(f"{record.path}: truncated JPEG (no end-of-image marker); re-copy or remove it")
    img = cv2.imread(str(record.path))  # BGR
    if img is None:
        raise LowbitError(f"{record.path}: cannot read image")
    h, w = img.shape[:2]
    if pre.resize == "letterbox":
        from ultralytics.data.augment import LetterBox

        out = LetterBox(new_shape=(imgsz, imgsz), auto=False, scaleup=True, padding_value=pre.pad)(image=img)
        gain, px, py = letterbox_geometry((h, w), imgsz)
        geometry = (gain, gain), (px, py)
    elif pre.resize == "letterbox-corner":  # YOLOX's preproc: resized into the top-left corner
        r = min(imgsz / h, imgsz / w)
        out = np.full((imgsz, imgsz, 3), pre.pad, np.uint8)
        out[:int(h * r), :int(w * r)] = cv2.resize(img, (int(w * r), int(h * r)), interpolation=_INTERP[pre.interp])
        geometry = (r, r), (0.0, 0.0)
    else:
        out = cv2.resize(img, (imgsz, imgsz), interpolation=_INTERP[pre.interp])
        geometry = (imgsz / w, imgsz / h), (0.0, 0.0)
    if pre.color == "rgb":
        out = out[..., ::-1]
    chw = np.ascontiguousarray(out.transpose(2, 0, 1))
    return Letterboxed(chw, record, (h, w), *geometry)


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


def image_array(dataset, imgsz: int, preprocess: Preprocess | None = None) -> np.ndarray:
    """Every image of `dataset` as the network takes it, in one [N, 3, imgsz, imgsz] float32 array (calibration
    on a graph)."""
    return torch.cat([b.images for b in make_batches(dataset, imgsz, 8, preprocess=preprocess)]).numpy()


def make_batches(dataset: Dataset, imgsz: int = 640, batch_size: int = 8, progress: bool = False,
                 preprocess: Preprocess | None = None) -> list[Batch]:
    """Decode and preprocess every image once; batches hold float tensors ready for the model."""
    from lowbit.progress import track

    pre = preprocess or Preprocess()
    items = [letterbox(r, imgsz, pre) for r in track(dataset.images, "loading images", enabled=progress)]
    mean = torch.tensor(pre.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1)
    batches = []
    for s in range(0, len(items), batch_size):
        chunk = items[s:s + batch_size]
        x = torch.from_numpy(np.stack([c.image for c in chunk])).float()
        x = x / 255.0 if pre.scale == 1 / 255 else x * pre.scale  # the default divides, as Ultralytics does
        if not pre.is_default:
            x = (x - mean) / std
        batches.append(Batch(x, chunk))
    return batches
