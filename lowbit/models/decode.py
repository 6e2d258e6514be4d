"""Turn a detector's raw output into boxes, whatever layout it comes in.

Layouts (B = batch, A = anchors):
- [B, N<=1000, 6]  end-to-end (YOLOv10 one-to-one head): x1 y1 x2 y2 score class, no NMS needed
- [B, 4+nc, A]     decoded boxes (cx cy w h) and class scores: NMS
- [B, 4*16+nc, A]  DFL box distributions and class logits, before decoding: decode, then NMS
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError

REG_MAX = 16


def _decode_dfl(raw: torch.Tensor, nc: int, imgsz: int) -> torch.Tensor:
    from ultralytics.utils.tal import dist2bbox, make_anchors

    b, _, a = raw.shape
    strides = [8, 16, 32]
    sizes = [(imgsz // s) ** 2 for s in strides]
    if sum(sizes) != a:
        raise LowbitError(f"raw output has {a} anchors; expected {sum(sizes)} for strides 8/16/32 at {imgsz}px")
    feats = [torch.zeros(1, 1, imgsz // s, imgsz // s) for s in strides]
    anchors, stride_t = make_anchors(feats, torch.tensor(strides, dtype=torch.float32), 0.5)
    anchors, stride_t = anchors.to(raw.device), stride_t.to(raw.device)
    box, cls = raw[:, : 4 * REG_MAX], raw[:, 4 * REG_MAX:]
    dist = box.view(b, 4, REG_MAX, a).softmax(2)
    dist = (dist * torch.arange(REG_MAX, dtype=raw.dtype, device=raw.device).view(1, 1, REG_MAX, 1)).sum(2)
    xywh = dist2bbox(dist, anchors.transpose(0, 1).unsqueeze(0), xywh=True, dim=1) * stride_t.transpose(0, 1)
    return torch.cat([xywh, cls.sigmoid()], 1)


def layout_of(out: torch.Tensor, nc: int) -> str:
    if out.ndim == 3 and out.shape[-1] == 6 and out.shape[1] <= 1000:
        return "end2end"
    if out.ndim == 3 and out.shape[1] == 4 + nc:
        return "decoded"
    if out.ndim == 3 and out.shape[1] == 4 * REG_MAX + nc:
        return "dfl"
    raise LowbitError(
        f"cannot decode a model output of shape {list(out.shape)} for {nc} classes; expected "
        f"[B,N,6] (end-to-end), [B,{4 + nc},A] (decoded boxes) or [B,{4 * REG_MAX + nc},A] (DFL logits)")


def decode(out: torch.Tensor, nc: int, imgsz: int, conf: float = 0.001, iou: float = 0.7,
           max_det: int = 300) -> list[torch.Tensor]:
    """Per image, an [n, 6] tensor of x1 y1 x2 y2 score class in letterboxed pixels."""
    from ultralytics.utils.nms import non_max_suppression

    layout = layout_of(out, nc)
    if layout == "dfl":
        out = _decode_dfl(out, nc, imgsz)
    # Same settings as Ultralytics' detection validator, so mAP matches `model.val()`.
    # max_time_img is raised from 0.05 s: on a slow CPU the default cuts NMS short, non-deterministically.
    return non_max_suppression(out, conf, iou, multi_label=True, max_det=max_det, nc=nc,
                               end2end=layout == "end2end", max_time_img=30.0)
