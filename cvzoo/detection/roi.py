"""RoI building blocks of two-stage detectors, for the whole batch at once: multi-level RoIAlign pooling
and balanced RoI sampling.

Boxes are absolute xyxy in input-image pixels, padded to (B, P, 4) with a (B, P) bool `valid` mask.
Neither block loops over images or boxes, and every shape depends only on (B, P) and the constructor
arguments, so both compile into one graph.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

LEVEL_EPS = 1e-6  # torchvision's LevelMapper eps: a box of exactly canonical_scale * 2**k lands on level k


class MultiLevelRoIAlign(nn.Module):
    """RoIAlign from an FPN pyramid: each box is pooled from the level chosen by the FPN paper's eq. (1),
    `floor(canonical_level + log2(sqrt(area) / canonical_scale) + eps)` clamped to the pyramid's levels.

    `forward([(B, C, H_l, W_l)], boxes (B, P, 4), valid (B, P)) -> (B, P, C, S_h, S_w)`; invalid rows are
    zeros. Same numbers as torchvision's `MultiScaleRoIAlign` (which loops over images to build its RoI
    list and infers scales from sizes); here the scales come from the declared `strides`.

    Eager, each box is pooled once, from its own level (one selection of that level's rows per level,
    a data-dependent shape, as torchvision). Under `torch.compile` shapes stay static instead: every level
    pools all B * P boxes and the level mask keeps the right result, `len(strides)` times the pooling work
    for one graph without breaks. Both give the same numbers (tested).
    """

    def __init__(self, output_size: int | tuple[int, int] = 7, sampling_ratio: int = 2,
                 strides: Sequence[int] = (4, 8, 16, 32), canonical_scale: float = 224,
                 canonical_level: int = 4, aligned: bool = False) -> None:
        """`strides`: downsampling of each pyramid level w.r.t. the input, high resolution first; powers of
        two, each twice the previous (the level mapper indexes levels by log2(stride)). `sampling_ratio`
        <= 0 means adaptive (as `torchvision.ops.roi_align`). `aligned` shifts boxes by -0.5 pixel
        (Detectron2); torchvision's Faster R-CNN uses False.
        """
        super().__init__()
        size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
            raise ValueError(f"output_size must be a positive int or a pair (height, width) of positive ints, "
                             f"got {output_size!r}")
        if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, int):
            raise ValueError(f"sampling_ratio must be an int (> 0: that many samples per bin side, <= 0: "
                             f"adaptive), got {sampling_ratio!r}")
        strides = tuple(strides)
        if not strides or not all(isinstance(s, int) and s > 0 and s & (s - 1) == 0 for s in strides):
            raise ValueError(f"strides must be a non-empty sequence of positive powers of two, got {strides!r}")
        if any(b != 2 * a for a, b in zip(strides, strides[1:])):
            raise ValueError(f"strides must double from one level to the next (the level mapper indexes levels "
                             f"by log2(stride)), got {strides!r}")
        if not (isinstance(canonical_scale, (int, float)) and math.isfinite(canonical_scale) and canonical_scale > 0):
            raise ValueError(f"canonical_scale must be a positive number, got {canonical_scale!r}")
        if isinstance(canonical_level, bool) or not isinstance(canonical_level, int):
            raise ValueError(f"canonical_level must be an int, got {canonical_level!r}")
        self.output_size = size
        self.sampling_ratio = sampling_ratio
        self.strides = strides
        self.canonical_scale = float(canonical_scale)
        self.canonical_level = canonical_level
        self.aligned = aligned
        self.k_min = strides[0].bit_length() - 1  # log2 of the finest stride
        self.k_max = strides[-1].bit_length() - 1
        self.num_levels = len(strides)

    def levels(self, boxes: Tensor) -> Tensor:
        """(..., 4) xyxy -> (...) int64 index into the pyramid (0 = finest), as torchvision's LevelMapper."""
        area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
        k = torch.floor(self.canonical_level + torch.log2(area.sqrt() / self.canonical_scale) + LEVEL_EPS)
        return k.clamp(min=self.k_min, max=self.k_max).to(torch.int64) - self.k_min

    def forward(self, features: Sequence[Tensor], boxes: Tensor, valid: Tensor) -> Tensor:
        """[(B, C, H_l, W_l)] high-res first, boxes (B, P, 4) xyxy input pixels, valid (B, P) bool
        -> (B, P, C, S_h, S_w), zeros on invalid rows."""
        if len(features) != self.num_levels:
            raise ValueError(f"features has {len(features)} levels but strides={self.strides} declares "
                             f"{self.num_levels}")
        if boxes.ndim != 3 or boxes.shape[-1] != 4:
            raise ValueError(f"boxes must be (B, P, 4) xyxy, got shape {tuple(boxes.shape)}")
        b, p = boxes.shape[:2]
        if valid.shape != (b, p) or valid.dtype != torch.bool:
            raise ValueError(f"valid must be a ({b}, {p}) bool mask matching boxes, got shape {tuple(valid.shape)} "
                             f"and dtype {valid.dtype}")
        c = features[0].shape[1]
        for i, f in enumerate(features):
            if f.ndim != 4 or f.shape[0] != b or f.shape[1] != c:
                raise ValueError(f"features[{i}] must be ({b}, {c}, H, W) (batch of boxes, channels of "
                                 f"features[0]), got shape {tuple(f.shape)}")
        # padding rows may hold anything (NaN included): give roi_align a harmless box there, the mask zeroes it
        flat_boxes = torch.where(valid[..., None], boxes, torch.zeros((), dtype=boxes.dtype, device=boxes.device))
        flat_boxes = flat_boxes.reshape(b * p, 4)  # (BP, 4)
        image = torch.arange(b, device=boxes.device, dtype=boxes.dtype).repeat_interleave(p)  # (BP,)
        rois = torch.cat([image[:, None], flat_boxes], dim=1)  # (BP, 5): roi_align's (image index, x1, y1, x2, y2)
        # invalid rows get level -1, which no level claims
        level = torch.where(valid.reshape(-1), self.levels(flat_boxes), torch.full_like(image, -1, dtype=torch.int64))
        out = features[0].new_zeros((b * p, c, *self.output_size))  # (BP, C, S_h, S_w)
        compiling = torch.compiler.is_compiling()
        for i, (f, stride) in enumerate(zip(features, self.strides)):  # static level count
            if compiling:  # fixed shapes: every level pools every box, the level's mask picks its rows
                pooled = roi_align(f, rois.to(f.dtype), self.output_size, spatial_scale=1.0 / stride,
                                   sampling_ratio=self.sampling_ratio, aligned=self.aligned)  # (BP, C, S_h, S_w)
                out = torch.where((level == i)[:, None, None, None], pooled.to(out.dtype), out)
            else:  # eager: each box pooled once, on its own level (as torchvision), a level's rows selected
                rows = (level == i).nonzero()[:, 0]
                out[rows] = roi_align(f, rois[rows].to(f.dtype), self.output_size, spatial_scale=1.0 / stride,
                                      sampling_ratio=self.sampling_ratio, aligned=self.aligned).to(out.dtype)
        return out.reshape(b, p, c, *self.output_size)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, sampling_ratio={self.sampling_ratio}, strides={self.strides}, "
                f"canonical_scale={self.canonical_scale}, canonical_level={self.canonical_level}, "
                f"aligned={self.aligned}")


def sample_rois(labels: Tensor, valid: Tensor, batch_size_per_image: int = 512, positive_fraction: float = 0.25,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Balanced RoI sampling for the whole batch, as torchvision's `BalancedPositiveNegativeSampler`.

    labels (B, P) int64: >= 0 foreground (class or matched-box index), -1 background, anything else
    (-2, IGNORE) ignored; valid (B, P) bool (False rows are never sampled)
    -> indices (B, S) int64 rows into P, keep (B, S) bool; S = batch_size_per_image.

    Per image: num_pos = min(#fg, int(S * positive_fraction)) foreground rows uniformly at random, then
    num_neg = min(#bg, S - num_pos) background rows uniformly at random. Output rows are the positives,
    then the negatives, then padding (keep False, index 0: a safe gather index, to be masked out).
    One random key per row and a top-k per group pick a uniform random subset for every image at once.
    """
    if isinstance(batch_size_per_image, bool) or not isinstance(batch_size_per_image, int) \
            or batch_size_per_image < 1:
        raise ValueError(f"batch_size_per_image must be a positive int, got {batch_size_per_image!r}")
    if isinstance(positive_fraction, bool) or not isinstance(positive_fraction, (int, float)) \
            or not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be a number in [0, 1], got {positive_fraction!r}")
    if labels.ndim != 2 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be a (B, P) integer tensor, got shape {tuple(labels.shape)} and dtype "
                         f"{labels.dtype}")
    if valid.shape != labels.shape or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool mask of the shape of labels {tuple(labels.shape)}, got shape "
                         f"{tuple(valid.shape)} and dtype {valid.dtype}")
    b, p = labels.shape
    s = batch_size_per_image
    device = labels.device
    slot = torch.arange(s, device=device)  # (S,)
    if p == 0:  # nothing to sample from (static shape, not data)
        return torch.zeros(b, s, dtype=torch.int64, device=device), torch.zeros(b, s, dtype=torch.bool, device=device)
    fg = valid & (labels >= 0)
    bg = valid & (labels == -1)
    num_pos = fg.sum(dim=1).clamp(max=int(s * positive_fraction))  # (B,)
    num_neg = torch.minimum(bg.sum(dim=1), s - num_pos)  # (B,)
    # uniform keys in [0, 1); rows outside a group get -1, so the group's rows lead its top-k in random order
    key = torch.rand(b, p, generator=generator, device=device)  # (B, P)
    k = min(s, p)
    none = torch.full((), -1.0, device=device)
    pos = torch.where(fg, key, none).topk(k, dim=1).indices  # (B, k): a random ordering of the foreground first
    neg = torch.where(bg, key, none).topk(k, dim=1).indices  # (B, k)
    n_pos, n_neg = num_pos[:, None], num_neg[:, None]  # (B, 1)
    is_pos = slot < n_pos  # (1, S) vs (B, 1) -> (B, S)
    keep = slot < n_pos + n_neg  # (B, S)
    pos_idx = torch.gather(pos, 1, slot.clamp(max=k - 1).expand(b, s))  # (B, S)
    neg_idx = torch.gather(neg, 1, (slot - n_pos).clamp(min=0, max=k - 1))  # (B, S)
    indices = torch.where(is_pos, pos_idx, neg_idx)
    return torch.where(keep, indices, torch.zeros_like(indices)), keep
