"""CenterNet targets: Gaussian class heatmaps, box sizes and centre offsets on one level, batched."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from cvzoo.detection.structures import TargetBatch


class CenterNetTargets(NamedTuple):
    heatmap: Tensor  # (B, H*W, K) in [0, 1], exactly 1 at each box centre cell
    sizes: Tensor  # (B, H*W, 2) box (w, h) / stride at centre cells
    offsets: Tensor  # (B, H*W, 2) centre / stride - floor(centre / stride) at centre cells
    mask: Tensor  # (B, H*W) 1.0 at cells that own a box centre, else 0


def gaussian_radius(width: Tensor, height: Tensor, min_overlap: float = 0.7) -> Tensor:
    """CornerNet's radius: the largest corner shift that keeps IoU >= min_overlap (smallest of three cases).

    Sizes in heatmap cells; (...) -> (...).
    """
    b1 = height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + torch.sqrt(b1**2 - 4 * c1)) / 2
    b2 = 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + torch.sqrt(b2**2 - 16 * c2)) / 2
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + torch.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return torch.minimum(torch.minimum(r1, r2), r3)


class CenterNetEncoder:
    """Boxes -> CenterNet targets for the whole batch. targets (B, M) -> CenterNetTargets on an (H, W) grid.

    A box's centre c = ((x1 + x2) / 2, (y1 + y2) / 2) / stride lands in cell floor(c); its class map gets
    exp(-d^2 / (2 sigma^2)), sigma = (2 r + 1) / 6, within r = max(0, int(gaussian_radius)) cells, max over
    boxes of a class. When two boxes share a centre cell the first (lowest index) one gives size and offset.
    """

    def __init__(self, num_classes: int, stride: int, min_overlap: float = 0.7) -> None:
        if num_classes < 1 or stride < 1 or not 0 < min_overlap < 1:
            raise ValueError(f"CenterNetEncoder needs num_classes >= 1, stride >= 1, 0 < min_overlap < 1; got "
                             f"{num_classes}, {stride}, {min_overlap}")
        self.num_classes = num_classes
        self.stride = stride
        self.min_overlap = min_overlap

    def __call__(self, targets: TargetBatch, size: tuple[int, int]) -> CenterNetTargets:
        h, w = size
        b, m = targets.labels.shape
        dev = targets.boxes.device
        valid = targets.valid  # (B, M)
        boxes = targets.boxes / self.stride
        ctr = (boxes[..., :2] + boxes[..., 2:]) / 2  # (B, M, 2)
        cell = ctr.floor().clamp(min=0)
        cell = torch.minimum(cell, torch.tensor([w - 1.0, h - 1.0], device=dev))
        bw, bh = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
        radius = gaussian_radius(bw, bh, self.min_overlap).clamp(min=0).floor()  # (B, M)
        sigma = (2 * radius + 1) / 6

        ys = torch.arange(h, device=dev, dtype=boxes.dtype)
        xs = torch.arange(w, device=dev, dtype=boxes.dtype)
        dx = xs[None, None, None, :] - cell[..., 0, None, None]  # (B, M, 1, W)
        dy = ys[None, None, :, None] - cell[..., 1, None, None]  # (B, M, H, 1)
        r = radius[..., None, None]
        gauss = torch.exp(-(dx**2 + dy**2) / (2 * sigma[..., None, None] ** 2))  # (B, M, H, W)
        window = (dx.abs() <= r) & (dy.abs() <= r) & valid[..., None, None]
        gauss = torch.where(window, gauss, torch.zeros((), device=dev)).reshape(b, m, h * w)
        index = targets.labels.clamp(min=0)[..., None].expand(-1, -1, h * w)  # (B, M, HW)
        heat = torch.zeros(b, self.num_classes, h * w, device=dev).scatter_reduce(1, index, gauss, "amax")

        flat = (cell[..., 1] * w + cell[..., 0]).long()  # (B, M) centre cell of each box
        sentinel = torch.full((b, h * w), m, dtype=torch.int64, device=dev)
        order = torch.arange(m, device=dev).expand(b, -1)
        owner_src = torch.where(valid, order, torch.full_like(order, m))
        owner = sentinel.scatter_reduce(1, flat, owner_src, "amin", include_self=True)  # (B, HW): box index or m
        has = owner < m
        idx = owner.clamp(max=m - 1)
        size_t = torch.gather(torch.stack([bw, bh], -1), 1, idx[..., None].expand(-1, -1, 2))  # (B, HW, 2)
        off_t = torch.gather(ctr - cell, 1, idx[..., None].expand(-1, -1, 2))
        zero = torch.zeros((), device=dev)
        return CenterNetTargets(
            heat.transpose(1, 2),  # (B, HW, K)
            torch.where(has[..., None], size_t, zero),
            torch.where(has[..., None], off_t, zero),
            has.float(),
        )
