"""Detector ONNX graphs lowbit did not export: how to feed them and how to read their outputs.

A model card says it: preprocessing (lowbit.data.loader.Preprocess), the decoder and the class list. It comes from
`<model>.lowbit.yaml` beside the graph, from command-line options (`--preprocess`, `--decoder`), or, where the
graph says enough, from its outputs: one output of [B, N, 6], [B, 4+nc, A] or [B, 4*16+nc, A] is an Ultralytics
head; one of [B, A, 5+nc] with A the anchor points of strides 8/16/32 at the input size is an anchor-free head
with objectness (YOLOX); boxes, scores and labels without a batch axis are a graph with NMS inside (torchvision's
SSD / RetinaNet / Faster R-CNN exports); boxes [B, A, 4] beside scores [B, A, C] need NMS outside. Preprocessing
cannot be read from a graph: a card or `--preprocess` sets it (Ultralytics' is the default).

Decoders follow each framework's own evaluation post-processing, so lowbit's mAP is the framework's:
- ultralytics: lowbit.models.decode (Ultralytics' validator settings);
- yolox: YOLOX's `postprocess` as its COCO evaluator calls it (boxes from grid offsets and exp sizes per stride,
  score = objectness x best class score, one class per anchor, class-aware NMS at IoU 0.65, score >= 0.01);
- boxes-scores: per class, score > 0.001, class-aware NMS at IoU 0.5, 100 per image;
- nms-inside: the graph's own boxes, scores and labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field, ValidationError

from lowbit.data.loader import Preprocess, parse_preprocess
from lowbit.errors import LowbitError

DECODERS = ("auto", "ultralytics", "yolox", "boxes-scores", "nms-inside")


class ModelCard(BaseModel):
    preprocess: Preprocess = Field(default_factory=Preprocess)
    decoder: Literal["auto", "ultralytics", "yolox", "boxes-scores", "nms-inside"] = "auto"
    # coco80: class i is the i-th COCO category in id order (Ultralytics, YOLOX); coco91: class i is COCO category
    # id i (torchvision); or an explicit {index: name}; None: the graph's own names, else coco80
    classes: Literal["coco80", "coco91"] | dict[int, str] | None = None
    strides: list[int] = Field(default_factory=lambda: [8, 16, 32])  # yolox
    boxes: Literal["pixels", "normalized"] = "pixels"  # boxes-scores / nms-inside: coordinates of the boxes output


def card_path(model: str | Path) -> Path:
    p = Path(model)
    return p.with_name(p.stem + ".lowbit.yaml")


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


def graph_input_size(path: str | Path) -> int | None:
    """The square input size of a graph with a static input, else None."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        dims = read_onnx(path).graph.input[0].type.tensor_type.shape.dim
        hw = [d.dim_value if d.HasField("dim_value") else None for d in dims][-2:]
    else:
        import openvino as ov

        ps = ov.Core().read_model(str(openvino_model_file(path))).input(0).partial_shape
        hw = [d.get_length() if d.is_static else None for d in ps][-2:]
    return hw[0] if len(hw) == 2 and hw[0] and hw[0] == hw[1] else None


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


def detect_decoder(outputs, nc: int, imgsz: int, strides: list[int]) -> str:
    """The decoder the outputs' shapes call for, or a clear error."""
    from lowbit.models.decode import REG_MAX

    outs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
    if len(outs) == 1:
        o = outs[0]
        if o.ndim == 3 and (o.shape[-1] == 6 and o.shape[1] <= 1000 or o.shape[1] in (4 + nc, 4 * REG_MAX + nc)):
            return "ultralytics"
        anchors = sum((imgsz // s) ** 2 for s in strides)
        if o.ndim == 3 and o.shape[1] == anchors and o.shape[2] > 5:
            return "yolox"
    if len(outs) == 3 and sorted(o.ndim for o in outs) == [1, 1, 2]:
        return "nms-inside"
    if len(outs) == 2 and all(o.ndim == 3 for o in outs) and 4 in (outs[0].shape[-1], outs[1].shape[-1]):
        return "boxes-scores"
    raise LowbitError(f"cannot decode model outputs of shapes {_shapes(outputs)}: not a detector head lowbit knows "
                      "(Ultralytics, anchor-free with objectness, boxes+scores, NMS inside); say how with --decoder or "
                      f"a model card ({card_path('MODEL.onnx').name} beside the graph)")


def decode(outputs, card: ModelCard, nc: int, imgsz: int) -> list[torch.Tensor]:
    """Per image, an [n, 6] tensor of x1 y1 x2 y2 score class in input pixels."""
    from lowbit.models import decode as ultralytics

    kind = card.decoder if card.decoder != "auto" else detect_decoder(outputs, nc, imgsz, card.strides)
    outs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
    if kind == "ultralytics":
        return ultralytics.decode(outs[0], nc, imgsz)
    if kind == "yolox":
        return _yolox(outs[0].float(), imgsz, card.strides)
    if kind == "nms-inside":
        return [_nms_inside(outs, imgsz, card.boxes)]
    return _boxes_scores(outs, imgsz, card.boxes)


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
