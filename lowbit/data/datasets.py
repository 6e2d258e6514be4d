"""Image sets with optional box labels: Ultralytics data yaml, COCO instances json, folder or list file.

Everything is read in place; nothing is ever written beside a dataset (Ultralytics' own loader
writes label caches next to the labels, which breaks read-only data).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from lowbit.errors import LowbitError

IMG_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


@dataclass
class ImageRecord:
    path: Path
    image_id: int
    width: int | None = None
    height: int | None = None
    # (class index, x1, y1, x2, y2) in original pixels; crowd regions excluded
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 5), np.float32))


@dataclass
class Dataset:
    """An ordered list of images; `coco` holds the ground truth in COCO form when labels exist."""

    name: str
    images: list[ImageRecord]
    names: dict[int, str] | None = None
    coco: dict | None = None  # a COCO instances dict (images, annotations, categories)
    source: str = ""

    @property
    def has_labels(self) -> bool:
        return self.coco is not None

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, max_images: int | None, seed: int | None = 0) -> "Dataset":
        """A deterministic subset: shuffled with `seed` (None keeps file order), cut to `max_images`."""
        if not max_images or max_images >= len(self.images):
            return self
        idx = list(range(len(self.images)))
        if seed is not None:
            random.Random(seed).shuffle(idx)
        keep = sorted(idx[:max_images])
        images = [self.images[i] for i in keep]
        coco = None
        if self.coco is not None:
            ids = {im.image_id for im in images}
            coco = dict(self.coco)
            coco["images"] = [im for im in self.coco["images"] if im["id"] in ids]
            coco["annotations"] = [a for a in self.coco["annotations"] if a["image_id"] in ids]
        return Dataset(self.name, images, self.names, coco, self.source)

    def category_ids(self, model_names: dict[int, str]) -> dict[int, int]:
        """Map a model's class index to this dataset's COCO category id, by class name."""
        if self.coco is None:
            raise LowbitError(f"{self.source}: dataset has no labels")
        by_name = {c["name"]: c["id"] for c in self.coco["categories"]}
        missing = [n for n in model_names.values() if n not in by_name]
        if len(missing) == len(model_names):
            raise LowbitError(f"{self.source}: none of the model's class names appear among the "
                              f"dataset's categories (model has e.g. {list(model_names.values())[:3]})")
        return {i: by_name[n] for i, n in model_names.items() if n in by_name}


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMG_SUFFIXES)


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception as e:
        raise LowbitError(f"{path}: cannot read image ({e})") from None


def _from_coco_json(json_path: Path, image_dir: Path | None) -> Dataset:
    try:
        coco = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LowbitError(f"{json_path}: malformed COCO json ({e})") from None
    if not isinstance(coco, dict) or not all(k in coco for k in ("images", "annotations", "categories")):
        raise LowbitError(f"{json_path}: not a COCO instances file (needs images, annotations, categories)")
    if image_dir is None:
        image_dir = json_path.parent.parent / "images"
    if not image_dir.is_dir():
        raise LowbitError(f"{json_path}: image folder {image_dir} not found (pass it explicitly)")
    cats = sorted(c["id"] for c in coco["categories"])
    names = {i: next(c["name"] for c in coco["categories"] if c["id"] == cid) for i, cid in enumerate(cats)}
    cls_of = {cid: i for i, cid in enumerate(cats)}
    boxes: dict[int, list] = {}
    for a in coco["annotations"]:
        if a.get("iscrowd", 0):
            continue
        x, y, w, h = a["bbox"]
        if w < 0 or h < 0:
            raise LowbitError(f"{json_path}: annotation {a.get('id', '?')} of image {a['image_id']} has a box of negative "
                              f"size {w} x {h} (COCO boxes are [x, y, width, height])")
        boxes.setdefault(a["image_id"], []).append([cls_of[a["category_id"]], x, y, x + w, y + h])
    records = []
    for im in sorted(coco["images"], key=lambda r: r["file_name"]):
        p = image_dir / im["file_name"]
        if not p.is_file():
            raise LowbitError(f"{json_path}: image {im['file_name']} not found in {image_dir}")
        records.append(ImageRecord(p, int(im["id"]), im.get("width"), im.get("height"),
                                   np.array(boxes.get(im["id"], []), np.float32).reshape(-1, 5)))
    if not records:
        raise LowbitError(f"{json_path}: no images listed")
    coco = {"images": coco["images"], "annotations": coco["annotations"], "categories": coco["categories"]}
    return Dataset(json_path.stem, records, names, coco, str(json_path))


def _from_yolo_labels(name: str, images: list[Path], label_dir_of, names: dict[int, str], source: str) -> Dataset:
    """Build COCO ground truth from Ultralytics txt labels (class cx cy w h, normalized)."""
    records, coco_images, anns = [], [], []
    for i, p in enumerate(images, start=1):
        w, h = _image_size(p)
        lab = label_dir_of(p)
        rows = []
        if lab.is_file():
            for ln, line in enumerate(lab.read_text().splitlines(), start=1):
                parts = line.split()
                if not parts:
                    continue
                try:
                    c, cx, cy, bw, bh = int(parts[0]), *map(float, parts[1:5])
                except (ValueError, TypeError):
                    raise LowbitError(f"{lab}:{ln}: malformed label line {line!r}") from None
                x1, y1 = (cx - bw / 2) * w, (cy - bh / 2) * h
                rows.append([c, x1, y1, x1 + bw * w, y1 + bh * h])
                anns.append({"id": len(anns) + 1, "image_id": i, "category_id": c + 1, "iscrowd": 0,
                             "bbox": [x1, y1, bw * w, bh * h], "area": bw * w * bh * h})
        records.append(ImageRecord(p, i, w, h, np.array(rows, np.float32).reshape(-1, 5)))
        coco_images.append({"id": i, "file_name": p.name, "width": w, "height": h})
    cats = [{"id": k + 1, "name": v} for k, v in sorted(names.items())]
    return Dataset(name, records, names, {"images": coco_images, "annotations": anns, "categories": cats}, source)


def _from_data_yaml(path: Path, split: str) -> Dataset:
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise LowbitError(f"{path}: malformed yaml ({e})") from None
    if not isinstance(cfg, dict) or split not in cfg or "names" not in cfg:
        raise LowbitError(f"{path}: not an Ultralytics data file (needs '{split}' and 'names')")
    root = path.parent / cfg["path"] if cfg.get("path") else path.parent  # an absolute "path" wins the join
    names = cfg["names"]
    names = {int(k): v for k, v in names.items()} if isinstance(names, dict) else dict(enumerate(names))
    img_dir = root / cfg[split]
    if not img_dir.is_dir():
        raise LowbitError(f"{path}: '{split}' folder {img_dir} not found")
    images = _list_images(img_dir)
    if not images:
        raise LowbitError(f"{path}: no images in {img_dir}")
    # The official COCO json, when it sits beside the data file, carries crowd regions and true areas.
    official = root / "annotations" / f"instances_{path.stem}.json"
    if official.is_file():
        return _from_coco_json(official, img_dir)

    def label_of(p: Path) -> Path:
        rel = p.relative_to(img_dir).with_suffix(".txt")
        return img_dir.parent / "labels" / rel

    return _from_yolo_labels(path.stem, images, label_of, names, str(path))


def assert_disjoint(train: Dataset, test: Dataset) -> None:
    """No test image may be trained on: same file, or same file name (COCO names carry the image id)."""
    seen = {r.path.resolve(): r.path for r in train.images} | {r.path.name: r.path for r in train.images}
    shared = [r.path for r in test.images if r.path.resolve() in seen or r.path.name in seen]
    if shared:
        raise LowbitError(f"{train.source} and {test.source} share {len(shared)} image(s), e.g. {shared[0]}: "
                          "training on evaluation images measures nothing")


def load_dataset(source: str | Path, images: str | Path | None = None, split: str = "val") -> Dataset:
    """Open a dataset from an Ultralytics data yaml, a COCO json (+ image folder), a folder or a list file."""
    path = Path(source)
    if not path.exists():
        raise LowbitError(f"{path}: dataset not found")
    if path.is_dir():
        files = _list_images(path / "images") if (path / "images").is_dir() else _list_images(path)
        yamls = sorted(path.glob("*.yaml"))
        if yamls and (path / "images").is_dir():
            return _from_data_yaml(yamls[0], split)
        if not files:
            raise LowbitError(f"{path}: no images found")
        return Dataset(path.name, [ImageRecord(p, i) for i, p in enumerate(files, 1)], source=str(path))
    if path.suffix in (".yaml", ".yml"):
        return _from_data_yaml(path, split)
    if path.suffix == ".json":
        return _from_coco_json(path, Path(images) if images else None)
    if path.suffix == ".txt":
        files = [Path(line.strip()) for line in path.read_text().splitlines() if line.strip()]
        files = [f if f.is_absolute() else path.parent / f for f in files]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise LowbitError(f"{path}: {len(missing)} listed images not found, e.g. {missing[0]}")
        if not files:
            raise LowbitError(f"{path}: list file names no images")
        return Dataset(path.stem, [ImageRecord(p, i) for i, p in enumerate(files, 1)], source=str(path))
    raise LowbitError(f"{path}: expected a data yaml, a COCO json, an image folder or a .txt list of images")
