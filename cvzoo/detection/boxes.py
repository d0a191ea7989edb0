"""Box utilities. Convention: boxes are absolute pixel xyxy (x1, y1, x2, y2) with x2 > x1, y2 > y1,
unless a function says otherwise; batched functions take (B, N, 4)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert as _tv_box_convert

FORMATS = ("xyxy", "xywh", "cxcywh")


def box_convert(boxes: Tensor, in_fmt: str, out_fmt: str) -> Tensor:
    """(..., 4) boxes from `in_fmt` to `out_fmt`, each of "xyxy", "xywh" (corner + size), "cxcywh"."""
    for name, fmt in (("in_fmt", in_fmt), ("out_fmt", out_fmt)):
        if fmt not in FORMATS:
            raise ValueError(f"{name} must be one of {FORMATS}, got {fmt!r}")
    shape = boxes.shape
    return _tv_box_convert(boxes.reshape(-1, 4), in_fmt, out_fmt).reshape(shape)


def box_area(boxes: Tensor) -> Tensor:
    """(..., 4) xyxy -> (...) area (negative sizes count as 0)."""
    wh = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def clip_boxes(boxes: Tensor, image_size: tuple[int, int] | Tensor) -> Tensor:
    """Clips xyxy boxes to the image. `image_size` is (H, W), or a (B, 2) tensor of per-image (H, W)
    for boxes (B, N, 4)."""
    if isinstance(image_size, Tensor):
        hw = image_size.to(boxes.dtype)[:, None, :]  # (B, 1, 2)
        upper = torch.cat([hw.flip(-1), hw.flip(-1)], dim=-1)  # (B, 1, 4): W, H, W, H
        return torch.minimum(boxes.clamp(min=0), upper)
    h, w = image_size
    x = boxes[..., 0::2].clamp(0, w)
    y = boxes[..., 1::2].clamp(0, h)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def valid_boxes(boxes: Tensor) -> Tensor:
    """(..., 4) -> (...) bool: finite and of positive width and height."""
    return torch.isfinite(boxes).all(dim=-1) & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])


def _inter_union(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])  # (B, N, M, 2)
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]  # (B, N, M)
    union = box_area(a)[..., :, None] + box_area(b)[..., None, :] - inter
    return inter, union


def pairwise_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of every pair: a (B, N, 4), b (B, M, 4) -> (B, N, M); also (N, 4), (M, 4) -> (N, M).

    Equals torchvision.ops.box_iou per image; batched with broadcasting (b may be (M, 4) shared).
    """
    if b.ndim == 2 and a.ndim == 3:
        b = b.expand(a.shape[0], -1, -1)
    inter, union = _inter_union(a, b)
    return inter / union


def pairwise_giou(a: Tensor, b: Tensor) -> Tensor:
    """Generalised IoU of every pair: (B, N, 4), (B, M, 4) -> (B, N, M) in [-1, 1]."""
    if b.ndim == 2 and a.ndim == 3:
        b = b.expand(a.shape[0], -1, -1)
    inter, union = _inter_union(a, b)
    iou = inter / union
    lt = torch.minimum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.maximum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / hull


def ltrb_giou(a: Tensor, b: Tensor, eps: float = 1e-7) -> Tensor:
    """GIoU of boxes given as non-negative ltrb distances from the same points: (..., 4), (..., 4) -> (...).

    Equal to `elementwise_giou` of the decoded boxes: decoding is a translation and a common scale (the
    stride), which GIoU ignores, and with every point inside both boxes the intersection and the hull are
    element-wise min / max of the distances. FCOS's loss uses it on the head's distances directly.
    """
    # (w, h) of the intersection, both boxes and the hull, stacked: four pairs of sums in one op each
    dist = torch.stack([torch.minimum(a, b), a, b, torch.maximum(a, b)])  # (4, ..., 4)
    wh = dist[..., :2] + dist[..., 2:]  # (4, ..., 2)
    inter, area_a, area_b, hull = (wh[..., 0] * wh[..., 1]).unbind(0)
    union = area_a + area_b - inter
    return inter / (union + eps) - (hull - union) / (hull + eps)


def elementwise_giou(a: Tensor, b: Tensor, eps: float = 1e-7) -> Tensor:
    """GIoU of matching rows: (..., 4), (..., 4) -> (...). Same formula as torchvision's GIoU loss, on
    (x, y) pairs so it dispatches few operations."""
    a_lt, a_rb, b_lt, b_rb = a[..., :2], a[..., 2:], b[..., :2], b[..., 2:]
    # the four (w, h) pairs stacked, areas as w * h: prod's backward (cumprod and flips, as it guards
    # against zeros) would add about ten operations per area
    wh = torch.stack([(torch.minimum(a_rb, b_rb) - torch.maximum(a_lt, b_lt)).clamp(min=0), a_rb - a_lt, b_rb - b_lt,
                      torch.maximum(a_rb, b_rb) - torch.minimum(a_lt, b_lt)])
    inter, area_a, area_b, hull = (wh[..., 0] * wh[..., 1]).unbind(0)
    union = area_a + area_b - inter
    return inter / (union + eps) - (hull - union) / (hull + eps)
