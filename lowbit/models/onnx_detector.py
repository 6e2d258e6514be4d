"""Detector ONNX graphs lowbit did not export: how to feed them and how to read their outputs.

A model card says it: preprocessing (lowbit.data.loader.Preprocess), the decoder and the class list. It comes from
`<model>.lowbit.yaml` beside the graph, from command-line options (`--preprocess`, `--decoder`), or, where the
graph says enough, from its outputs: one output of [B, N, 6], [B, 4+nc, A] or [B, 4*16+nc, A] is an Ultralytics
head; one of [B, A, 5+nc] with A the anchor points of strides 8/16/32 at the input size is an anchor-free head
with objectness (YOLOX); per level a score map [B, A_l, C] and a box-distribution map [B, A_l, 4 (reg_max + 1)]
are a generalized-focal-loss head (GFL: PP-PicoDet, NanoDet); boxes, scores and labels without a batch axis are a
graph with NMS inside (torchvision's SSD / RetinaNet / Faster R-CNN exports); boxes [B, A, 4] beside scores
[B, A, C] need NMS outside. Preprocessing
cannot be read from a graph: a card or `--preprocess` sets it (Ultralytics' is the default).

Decoders follow each framework's own evaluation post-processing, so lowbit's mAP is the framework's:
- ultralytics: lowbit.models.decode (Ultralytics' validator settings);
- yolox: YOLOX's `postprocess` as its COCO evaluator calls it (boxes from grid offsets and exp sizes per stride,
  score = objectness x best class score, one class per anchor, class-aware NMS at IoU 0.65, score >= 0.01);
- gfl: PaddleDetection's GFL post-processing (each side's distance the expectation of a softmax over reg_max + 1
  bins, times the stride, from cell points (i + cell_offset) * stride; per class score > 0.025, the 1000 best,
  NMS at IoU 0.6; 100 per image);
- boxes-scores: per class, score > 0.001, class-aware NMS at IoU 0.5, 100 per image;
- nms-inside: the graph's own boxes, scores and labels;
- nms-rows: the graph's own rows of [class, score, x1, y1, x2, y2] (PaddleDetection's exports with NMS inside,
  boxes in the image's own pixels: card `boxes: original`, with `inputs: {scale_factor: scale_factor}`).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, Field, ValidationError

from lowbit.data.loader import Preprocess, parse_preprocess
from lowbit.errors import LowbitError

DECODERS = ("auto", "ultralytics", "yolox", "gfl", "boxes-scores", "nms-inside", "nms-rows")
# which card keys shape each decoder (named in errors)
DECODER_KEYS = {"ultralytics": "", "yolox": "strides", "gfl": "strides, reg_max, cell_offset",
                "boxes-scores": "boxes", "nms-inside": "boxes", "nms-rows": "boxes"}


class ModelCard(BaseModel):
    preprocess: Preprocess = Field(default_factory=Preprocess)
    decoder: Literal["auto", "ultralytics", "yolox", "gfl", "boxes-scores", "nms-inside", "nms-rows"] = "auto"
    # coco80: class i is the i-th COCO category in id order (Ultralytics, YOLOX); coco91: class i is COCO category
    # id i (torchvision); or an explicit {index: name}; None: the graph's own names, else coco80
    classes: Literal["coco80", "coco91"] | dict[int, str] | None = None
    # yolox, gfl: one stride per output level (gfl default: 8, 16, 32, ... for as many levels as the graph has)
    strides: list[int] | None = None
    reg_max: int | None = None  # gfl: bins per box side minus one (default: read off the distribution maps)
    cell_offset: float = 0.5  # gfl: a cell's point is (index + cell_offset) * stride (PP-PicoDet, NanoDet: 0.5)
    # boxes-scores / nms-inside / nms-rows: coordinates of the boxes output (original: the image's own pixels, as
    # graphs fed a scale_factor return them)
    boxes: Literal["pixels", "normalized", "original"] = "pixels"
    # graph inputs beside the image, each fed per image: scale_factor = [h_in / h_img, w_in / w_img] (input pixels
    # per image pixel, PaddleDetection's), im_shape = [h_in, w_in] (the network input's size), image_size =
    # [h_img, w_img], or a constant list
    inputs: dict[str, Literal["scale_factor", "im_shape", "image_size"] | list[float]] = Field(default_factory=dict)

    @property
    def is_default(self) -> bool:
        return self == ModelCard()


def card_path(model: str | Path) -> Path:
    p = Path(model)
    return p.with_name(p.stem + ".lowbit.yaml")


def save_card(card: "ModelCard", model: str | Path) -> Path:
    """Write `card` beside `model` (what `load_card` reads back)."""
    import yaml

    from lowbit.io import atomic_write_text

    return atomic_write_text(card_path(model), yaml.safe_dump(card.model_dump(mode="json", exclude_defaults=True),
                                                              sort_keys=False))


def load_card(model: str | Path, preprocess: str | None = None, decoder: str | None = None,
              classes: str | None = None) -> ModelCard:
    """The card beside `model` (if any), with the command line's settings on top."""
    import yaml

    raw: dict = {}
    path = card_path(model)
    if path.is_file():
        try:
            raw = yaml.safe_load(path.read_text()) or {}
            if isinstance(raw.get("preprocess"), str):
                raw["preprocess"] = parse_preprocess(raw["preprocess"]).model_dump()
        except yaml.YAMLError as e:
            raise LowbitError(f"{path}: malformed yaml ({e})") from None
    if preprocess:
        raw["preprocess"] = parse_preprocess(preprocess).model_dump()
    if decoder:
        if decoder not in DECODERS:
            raise LowbitError(f"unknown decoder {decoder!r}; use one of {', '.join(DECODERS)}")
        raw["decoder"] = decoder
    if classes:
        raw["classes"] = classes
    try:
        return ModelCard.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        raise LowbitError(f"{path if path.is_file() else model}: model card {'.'.join(map(str, err['loc']))}: "
                          f"{err['msg']}") from None


def openvino_model_file(path: str | Path) -> Path:
    """The file OpenVINO reads for `path`: an .onnx, an IR .xml, or the one .xml in an IR folder."""
    path = Path(path)
    if path.is_dir():
        xmls = sorted(path.glob("*.xml"))
        if len(xmls) != 1:
            raise LowbitError(f"{path}: an OpenVINO IR folder holds one .xml model; found {len(xmls)}")
        return xmls[0]
    if not path.is_file():
        raise LowbitError(f"{path}: model file not found")
    return path


def read_onnx(path: str | Path):
    """An .onnx file's graph (without external weights), or a LowbitError naming the file when it is none."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"{path}: ONNX file not found")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends: the file is not an ONNX model, or is cut short
        raise LowbitError(f"{path}: not a readable ONNX file ({str(e).splitlines()[0][:200]})") from None


def quiet_session_options(threads: int | None = None):
    """ONNX Runtime session options without its warnings (e.g. initializers listed as graph inputs, common in older
    exports), which are not the user's to act on."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return opts


def extra_feeds(card: "ModelCard | None", inputs: dict[str, tuple[list, str]], items=None, imgsz: int = 640,
                batch: int = 1, where: str = "the graph") -> dict[str, np.ndarray]:
    """What to feed a graph's inputs beside the image (`inputs`: name -> (shape, dtype name)), as its model card
    describes them, per image of `items` (lowbit.data.loader.Letterboxed); without items (calibration), values for
    a square image of the input's size. An input the card does not describe is refused by name."""
    spec = card.inputs if card is not None else {}
    missing = [n for n in inputs if n not in spec]
    if missing:
        n = missing[0]
        raise LowbitError(f"{where}: input {n!r} {list(inputs[n][0])} is not described: the model card's `inputs` "
                          f"key says what to feed it, e.g. `inputs: {{{n}: scale_factor}}` (scale_factor, im_shape, "
                          f"image_size, or a constant list) in {card_path('MODEL.onnx').name} beside the graph")
    feeds = {}
    for name, (shape, dtype) in inputs.items():
        kind = spec[name]
        rows = []
        for i in range(batch):
            it = items[i] if items is not None else None
            h, w = it.orig_shape if it is not None else (imgsz, imgsz)
            gx, gy = it.gain if it is not None else (1.0, 1.0)
            rows.append({"scale_factor": [gy, gx], "im_shape": [imgsz, imgsz], "image_size": [h, w]}[kind]
                        if isinstance(kind, str) else list(kind))
        floating = "float" in dtype or dtype.startswith("f")  # ONNX Runtime: tensor(float); OpenVINO: f32
        arr = np.asarray(rows, dtype=np.float32 if floating else np.int64 if "64" in dtype else np.int32)
        if len(shape) == 1:  # no batch axis
            arr = arr[0]
        feeds[name] = arr
    return feeds


def graph_input_size(path: str | Path, graph=None) -> int | None:
    """The square input size of a graph with a static input, else None (`graph`: the .onnx already read)."""
    path = Path(path)
    if graph is not None or path.suffix == ".onnx":
        dims = (graph or read_onnx(path)).graph.input[0].type.tensor_type.shape.dim
        hw = [d.dim_value if d.HasField("dim_value") else None for d in dims][-2:]
    else:
        import openvino as ov

        ps = ov.Core().read_model(str(openvino_model_file(path))).input(0).partial_shape
        hw = [d.get_length() if d.is_static else None for d in ps][-2:]
    return hw[0] if len(hw) == 2 and hw[0] and hw[0] == hw[1] else None


def is_graph(path: Path) -> bool:
    return path.suffix in (".onnx", ".xml") or path.is_dir() and any(path.glob("*.xml"))


def graph_names(path: Path) -> dict[int, str] | None:
    """Class names an exported graph carries: Ultralytics writes them into an ONNX's metadata and into the
    metadata.yaml beside an OpenVINO IR, as a Python dict literal or a mapping."""
    if path.suffix == ".onnx":
        meta = {p.key: p.value for p in read_onnx(path).metadata_props}
        names = meta.get("names")
        return {int(k): v for k, v in ast.literal_eval(names).items()} if names else None
    meta = path.parent / "metadata.yaml"
    if meta.is_file():
        import yaml

        names = (yaml.safe_load(meta.read_text()) or {}).get("names")
        return {int(k): v for k, v in names.items()} if isinstance(names, dict) else None
    return None


def graph_card(model: str | Path, imgsz: int | None, preprocess: str | None = None, decoder: str | None = None,
               graph=None) -> tuple[ModelCard, int]:
    """(model card, input size) of an .onnx: the card beside it with the options on top; the graph's own static
    input size unless `imgsz` says otherwise (and then they must agree). `graph`: the file already read."""
    if graph is None and not Path(model).is_file():
        raise LowbitError(f"{model}: ONNX file not found")
    size = graph_input_size(model, graph)
    if imgsz is not None and size is not None and imgsz != size:
        raise LowbitError(f"{model}: its input takes {size}x{size} images, not {imgsz}")
    size = imgsz or size or 640
    if size <= 0 or size % 32:
        raise LowbitError(f"{model}: image size {size} must be a positive multiple of 32")
    return load_card(model, preprocess, decoder), size


def class_names(card: ModelCard, graph_names: dict[int, str] | None, dataset) -> dict[int, str]:
    """Model class index -> name, to be matched by name against the dataset's categories."""
    if isinstance(card.classes, dict):
        return {int(k): v for k, v in card.classes.items()}
    cats = sorted((dataset.coco or {}).get("categories", []), key=lambda c: c["id"]) if dataset is not None else []
    if card.classes == "coco91":
        return {c["id"]: c["name"] for c in cats}
    if card.classes is None and graph_names:
        return graph_names
    if card.classes == "coco80" or card.classes is None:
        if not cats and dataset is not None and dataset.names:
            return dict(dataset.names)
        return {i: c["name"] for i, c in enumerate(cats)}
    return graph_names or {}


def _shapes(outputs) -> list[tuple]:
    return [tuple(o.shape) for o in (outputs if isinstance(outputs, (tuple, list)) else [outputs])]


def _gfl_levels(outs: list, nc: int) -> tuple[list, list] | None:
    """(score maps, distribution maps) of a GFL head, level by level, or None when the outputs are not one."""
    if len(outs) < 2 or len(outs) % 2 or any(o.ndim != 3 for o in outs):
        return None
    scores = [o for o in outs if o.shape[-1] == nc]
    dists = [o for o in outs if o.shape[-1] != nc]
    if len(scores) != len(dists) or any(d.shape[-1] % 4 or d.shape[-1] < 8 for d in dists):
        return None
    if [s.shape[1] for s in scores] != [d.shape[1] for d in dists]:
        return None
    return scores, dists


def _fits(kind: str, outs: list, nc: int, imgsz: int, card: ModelCard) -> bool:
    from lowbit.models.decode import REG_MAX

    if kind == "ultralytics":
        o = outs[0]
        return len(outs) == 1 and o.ndim == 3 and (o.shape[-1] == 6 and o.shape[1] <= 1000
                                                   or o.shape[1] in (4 + nc, 4 * REG_MAX + nc))
    if kind == "yolox":
        anchors = sum((imgsz // s) ** 2 for s in card.strides or [8, 16, 32])
        return len(outs) == 1 and outs[0].ndim == 3 and outs[0].shape[1] == anchors and outs[0].shape[2] > 5
    if kind == "gfl":
        levels = _gfl_levels(outs, nc)
        return levels is not None and [s.shape[1] for s in levels[0]] == [
            (-(-imgsz // s)) ** 2 for s in _gfl_strides(card, len(levels[0]))]
    if kind == "nms-inside":
        return len(outs) == 3 and sorted(o.ndim for o in outs) == [1, 1, 2]
    if kind == "nms-rows":
        rows = [o for o in outs if o.is_floating_point() and o.shape[-1] == 6 and (o.ndim == 2 or o.ndim == 3
                                                                                   and o.shape[0] == 1)]
        return len(rows) == 1 and all(o is rows[0] or o.ndim <= 1 and not o.is_floating_point() for o in outs)
    return len(outs) == 2 and all(o.ndim == 3 for o in outs) and 4 in (outs[0].shape[-1], outs[1].shape[-1])


def _gfl_strides(card: ModelCard, levels: int) -> list[int]:
    return card.strides or [8 * 2 ** i for i in range(levels)]


def detect_decoder(outputs, nc: int, imgsz: int, card: ModelCard | None = None) -> str:
    """The decoder the outputs' shapes call for, or a clear error."""
    card = card or ModelCard()
    outs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
    for kind in ("ultralytics", "yolox", "gfl", "nms-inside", "nms-rows", "boxes-scores"):
        if _fits(kind, outs, nc, imgsz, card):
            return kind
    raise LowbitError(f"cannot decode model outputs of shapes {_shapes(outputs)}: not a detector head lowbit knows "
                      "(Ultralytics, anchor-free with objectness, GFL score + distribution maps per level, "
                      "boxes+scores, NMS inside); say how with --decoder or the `decoder` key of a model card "
                      f"({card_path('MODEL.onnx').name} beside the graph)")


def decode(outputs, card: ModelCard, nc: int, imgsz: int) -> list[torch.Tensor]:
    """Per image, an [n, 6] tensor of x1 y1 x2 y2 score class in input pixels."""
    from lowbit.models import decode as ultralytics

    outs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
    kind = card.decoder if card.decoder != "auto" else detect_decoder(outs, nc, imgsz, card)
    if not _fits(kind, outs, nc, imgsz, card):
        keys = DECODER_KEYS[kind]
        raise LowbitError(f"decoder {kind!r} does not fit the graph's outputs {_shapes(outs)} at {imgsz} px with "
                          f"{nc} classes{f' (card keys {keys}: {_card_values(card, keys)})' if keys else ''}; "
                          "set `decoder` (or those keys) in the model card, or --decoder")
    if kind == "ultralytics":
        return ultralytics.decode(outs[0], nc, imgsz)
    if kind == "yolox":
        return _yolox(outs[0].float(), imgsz, card.strides or [8, 16, 32])
    if kind == "gfl":
        scores, dists = _gfl_levels(outs, nc)
        return _gfl(scores, dists, imgsz, _gfl_strides(card, len(scores)), card.reg_max, card.cell_offset)
    if kind == "nms-inside":
        return [_nms_inside(outs, imgsz, card.boxes)]
    if kind == "nms-rows":
        return [_nms_rows(outs, imgsz, card.boxes)]
    return _boxes_scores(outs, imgsz, card.boxes)


def _card_values(card: ModelCard, keys: str) -> str:
    return ", ".join(f"{k}={getattr(card, k)}" for k in keys.split(", "))


def _gfl(scores: list[torch.Tensor], dists: list[torch.Tensor], imgsz: int, strides: list[int], reg_max: int | None,
         cell_offset: float, conf: float = 0.025, iou: float = 0.6, per_class: int = 1000,
         max_det: int = 100) -> list[torch.Tensor]:
    from torchvision.ops import batched_nms

    bins = dists[0].shape[-1] // 4
    if reg_max is not None and reg_max + 1 != bins:
        raise LowbitError(f"the distribution maps hold {bins} bins per box side; the card's reg_max {reg_max} "
                          f"says {reg_max + 1}")
    project = torch.arange(bins, dtype=torch.float32)
    boxes, points = [], []
    for d, s in zip(dists, strides):
        n = -(-imgsz // s)
        yv, xv = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        points.append(((torch.stack((xv, yv), -1).reshape(-1, 2).float() + cell_offset) * s))
        dist = (d.float().reshape(*d.shape[:2], 4, bins).softmax(-1) @ project) * s
        boxes.append(dist)
    point = torch.cat(points)
    dist = torch.cat(boxes, 1)
    xyxy = torch.cat([point - dist[..., :2], point + dist[..., 2:]], -1)
    score = torch.cat([s.float() for s in scores], 1)
    result = []
    for b in range(score.shape[0]):
        a, c = (score[b] > conf).nonzero(as_tuple=True)
        sc = score[b][a, c]
        keep = torch.cat([torch.nonzero(c == k).flatten()[sc[c == k].argsort(descending=True)[:per_class]]
                          for k in c.unique()]) if len(c) else c
        a, c, sc = a[keep], c[keep], sc[keep]
        idx = batched_nms(xyxy[b][a], sc, c, iou)[:max_det]
        result.append(torch.cat([xyxy[b][a][idx], sc[idx, None], c[idx, None].float()], 1))
    return result


def _yolox(out: torch.Tensor, imgsz: int, strides: list[int], conf: float = 0.01, iou: float = 0.65) -> list[torch.Tensor]:
    from torchvision.ops import batched_nms

    grids, scale = [], []
    for s in strides:
        n = imgsz // s
        yv, xv = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        grids.append(torch.stack((xv, yv), 2).reshape(-1, 2))
        scale.append(torch.full((n * n, 1), float(s)))
    grid, stride = torch.cat(grids).float(), torch.cat(scale)
    if out.shape[1] != len(grid):
        raise LowbitError(f"anchor-free output has {out.shape[1]} anchors; strides {strides} at {imgsz} px give {len(grid)}")
    xy = (out[..., :2] + grid) * stride
    wh = out[..., 2:4].exp() * stride
    boxes = torch.cat([xy - wh / 2, xy + wh / 2], -1)
    result = []
    for b in range(out.shape[0]):
        cls_conf, cls = out[b, :, 5:].max(1)
        score = out[b, :, 4] * cls_conf
        keep = score >= conf
        bx, sc, cl = boxes[b][keep], score[keep], cls[keep].float()
        idx = batched_nms(bx, sc, cl.long(), iou)
        result.append(torch.cat([bx[idx], sc[idx, None], cl[idx, None]], 1))
    return result


def _nms_inside(outs: list[torch.Tensor], imgsz: int, coords: str) -> torch.Tensor:
    boxes = next(o for o in outs if o.ndim == 2).float()
    ints = [o for o in outs if o.ndim == 1 and not o.is_floating_point()]
    floats = [o for o in outs if o.ndim == 1 and o.is_floating_point()]
    if len(ints) != 1 or len(floats) != 1:
        raise LowbitError(f"an NMS-inside graph returns boxes, integer labels and float scores; got {_shapes(outs)}")
    if coords == "normalized":
        boxes = boxes * imgsz
    return torch.cat([boxes, floats[0].float()[:, None], ints[0].float()[:, None]], 1)


def _nms_rows(outs: list[torch.Tensor], imgsz: int, coords: str) -> torch.Tensor:
    """PaddleDetection's exports with NMS inside: rows of [class, score, x1, y1, x2, y2] (padding rows have class
    -1) beside a count per image."""
    rows = next(o for o in outs if o.is_floating_point() and o.shape[-1] == 6).float().reshape(-1, 6)
    rows = rows[rows[:, 0] >= 0]
    boxes = rows[:, 2:6] * imgsz if coords == "normalized" else rows[:, 2:6]
    return torch.cat([boxes, rows[:, 1:2], rows[:, 0:1]], 1)


def to_input_pixels(dets: list[torch.Tensor], items) -> list[torch.Tensor]:
    """Detections a graph returned in each image's own pixels (card `boxes: original`) -> input pixels, as every
    other decoder returns them."""
    out = []
    for d, it in zip(dets, items):
        d = d.clone()
        d[:, [0, 2]] = d[:, [0, 2]] * it.gain[0] + it.offset[0]
        d[:, [1, 3]] = d[:, [1, 3]] * it.gain[1] + it.offset[1]
        out.append(d)
    return out


def _boxes_scores(outs: list[torch.Tensor], imgsz: int, coords: str, conf: float = 0.001, iou: float = 0.5,
                  max_det: int = 100) -> list[torch.Tensor]:
    from torchvision.ops import batched_nms

    boxes, scores = (outs[0], outs[1]) if outs[0].shape[-1] == 4 else (outs[1], outs[0])
    boxes, scores = boxes.float(), scores.float()
    if coords == "normalized":
        boxes = boxes * imgsz
    result = []
    for b in range(boxes.shape[0]):
        a, c = (scores[b] > conf).nonzero(as_tuple=True)
        bx, sc = boxes[b][a], scores[b][a, c]
        idx = batched_nms(bx, sc, c, iou)[:max_det]
        result.append(torch.cat([bx[idx], sc[idx, None], c[idx, None].float()], 1))
    return result
