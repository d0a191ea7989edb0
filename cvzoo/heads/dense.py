"""Dense detection heads: per-location predictions on every pyramid level, flattened to (B, R, K).

Rows are ordered (level, y, x, anchor). Heads know nothing of boxes, anchors or targets: the
regression outputs are raw codes whose meaning the detector's box coder defines.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor, nn

from cvzoo.layers import ActLayer, ConvNormAct, NormLayer, init_conv_normal_, prior_probability_bias


class DenseOutput(NamedTuple):
    cls_logits: Tensor  # (B, R, K), R = sum_l H_l*W_l*A, rows ordered (level, y, x, anchor)
    box_deltas: Tensor  # (B, R, 4), encoded w.r.t. the anchor of the same row


class ATSSOutput(NamedTuple):
    cls_logits: Tensor  # (B, R, K), R = sum_l H_l*W_l*A
    box_deltas: Tensor  # (B, R, 4), encoded w.r.t. the anchor of the same row
    centerness: Tensor  # (B, R, 1) logits


class FCOSOutput(NamedTuple):
    cls_logits: Tensor  # (B, R, K), R = sum_l H_l*W_l
    box_distances: Tensor  # (B, R, 4) ltrb distances in units of the level's stride, >= 0
    centerness: Tensor  # (B, R, 1) logits


class CenterNetOutput(NamedTuple):
    heatmap_logits: Tensor  # (B, H*W, K) on one level, rows ordered (y, x)
    sizes: Tensor  # (B, H*W, 2) box (w, h) in units of the level's stride
    offsets: Tensor  # (B, H*W, 2) sub-cell centre offset in [0, 1) cells


def group_norm_32(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (fewer when the channel count is not a multiple), as RetinaNet v2 and FCOS."""
    groups = 32
    while channels % groups:
        groups //= 2
    return nn.GroupNorm(groups, channels)


def _flatten(x: Tensor, k: int) -> Tensor:
    """(B, A*k, H, W) -> (B, H*W*A, k), rows ordered (y, x, anchor)."""
    b, _, h, w = x.shape
    return x.reshape(b, -1, k, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, k)  # (B, HWA, k)


def _tower(channels: int, num_convs: int, norm_layer: NormLayer | None, act_layer: ActLayer,
           bias: bool | None = None) -> nn.Sequential:
    return nn.Sequential(*(ConvNormAct(channels, channels, 3, norm_layer=norm_layer, act_layer=act_layer, bias=bias)
                           for _ in range(num_convs)))


class RetinaHead(nn.Module):
    """RetinaNet head: two conv towers shared over levels, then A*K class logits and A*4 box deltas.

    [(B, C, H_l, W_l)] -> DenseOutput((B, R, K), (B, R, 4)). The class bias starts at the focal-loss
    prior (`prior_prob`); `norm_layer=group_norm_32` gives RetinaNet v2's head.
    """

    def __init__(self, in_channels: int, num_classes: int, num_anchors: int = 9, num_convs: int = 4,
                 norm_layer: NormLayer | None = None, act_layer: ActLayer = nn.ReLU, prior_prob: float = 0.01) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 1 or num_anchors < 1 or num_convs < 0:
            raise ValueError(f"RetinaHead needs positive in_channels, num_classes, num_anchors and num_convs >= 0; "
                             f"got {in_channels}, {num_classes}, {num_anchors}, {num_convs}")
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        self.cls_tower = _tower(in_channels, num_convs, norm_layer, act_layer)
        self.box_tower = _tower(in_channels, num_convs, norm_layer, act_layer)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors * num_classes, 3, padding=1)
        self.box_deltas = nn.Conv2d(in_channels, num_anchors * 4, 3, padding=1)
        init_conv_normal_(self, std=0.01)
        nn.init.constant_(self.cls_logits.bias, prior_probability_bias(prior_prob))

    def forward(self, feats: Sequence[Tensor]) -> DenseOutput:
        cls, box = [], []
        for f in feats:  # loop over levels (static count), never over images
            cls.append(_flatten(self.cls_logits(self.cls_tower(f)), self.num_classes))  # (B, HWA, K)
            box.append(_flatten(self.box_deltas(self.box_tower(f)), 4))  # (B, HWA, 4)
        return DenseOutput(torch.cat(cls, dim=1), torch.cat(box, dim=1))


class ATSSHead(RetinaHead):
    """ATSS head: RetinaHead towers (GroupNorm by default) with a learnable scale per level on the box
    deltas and centre-ness logits from the box tower.

    [(B, C, H_l, W_l)] -> ATSSOutput((B, R, K), (B, R, 4), (B, R, 1)).
    """

    def __init__(self, in_channels: int, num_classes: int, num_levels: int, num_anchors: int = 1,
                 num_convs: int = 4, norm_layer: NormLayer | None = group_norm_32, act_layer: ActLayer = nn.ReLU,
                 prior_prob: float = 0.01) -> None:
        if num_levels < 1:
            raise ValueError(f"num_levels must be positive, got {num_levels}")
        super().__init__(in_channels, num_classes, num_anchors, num_convs, norm_layer, act_layer, prior_prob)
        self.centerness = nn.Conv2d(in_channels, num_anchors, 3, padding=1)
        init_conv_normal_(self.centerness, std=0.01)
        self.scales = nn.Parameter(torch.ones(num_levels))

    def forward(self, feats: Sequence[Tensor]) -> ATSSOutput:
        cls, box, ctr = [], [], []
        for level, f in enumerate(feats):
            t = self.box_tower(f)
            cls.append(_flatten(self.cls_logits(self.cls_tower(f)), self.num_classes))  # (B, HWA, K)
            box.append(_flatten(self.scales[level] * self.box_deltas(t), 4))  # (B, HWA, 4)
            ctr.append(_flatten(self.centerness(t), 1))  # (B, HWA, 1)
        return ATSSOutput(torch.cat(cls, dim=1), torch.cat(box, dim=1), torch.cat(ctr, dim=1))


class FCOSHead(nn.Module):
    """FCOS head: class tower -> K logits; box tower -> ltrb distances relu(scale_l * x) with a learnable
    scale per level, and centre-ness logits from the box tower (as torchvision and FCOS v2).

    [(B, C, H_l, W_l)] -> FCOSOutput((B, R, K), (B, R, 4), (B, R, 1)). Distances are in units of
    the level's stride.
    """

    def __init__(self, in_channels: int, num_classes: int, num_levels: int, num_convs: int = 4,
                 norm_layer: NormLayer | None = group_norm_32, act_layer: ActLayer = nn.ReLU,
                 prior_prob: float = 0.01) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 1 or num_levels < 1 or num_convs < 0:
            raise ValueError(f"FCOSHead needs positive in_channels, num_classes, num_levels and num_convs >= 0; "
                             f"got {in_channels}, {num_classes}, {num_levels}, {num_convs}")
        self.num_classes = num_classes
        self.num_anchors = 1
        self.cls_tower = _tower(in_channels, num_convs, norm_layer, act_layer, bias=True)
        self.box_tower = _tower(in_channels, num_convs, norm_layer, act_layer, bias=True)
        self.cls_logits = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.box_distances = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.centerness = nn.Conv2d(in_channels, 1, 3, padding=1)
        self.scales = nn.Parameter(torch.ones(num_levels))
        init_conv_normal_(self, std=0.01)
        nn.init.constant_(self.cls_logits.bias, prior_probability_bias(prior_prob))

    def forward(self, feats: Sequence[Tensor]) -> FCOSOutput:
        cls, box, ctr = [], [], []
        for level, f in enumerate(feats):
            t = self.box_tower(f)
            cls.append(_flatten(self.cls_logits(self.cls_tower(f)), self.num_classes))  # (B, HW, K)
            box.append(_flatten(torch.relu(self.scales[level] * self.box_distances(t)), 4))  # (B, HW, 4)
            ctr.append(_flatten(self.centerness(t), 1))  # (B, HW, 1)
        return FCOSOutput(torch.cat(cls, dim=1), torch.cat(box, dim=1), torch.cat(ctr, dim=1))


class CenterNetHead(nn.Module):
    """CenterNet head on one level: heatmap (K), size (2) and offset (2) branches, each 3x3 conv, ReLU, 1x1.

    [(B, C, H, W)] (reads `feats[in_index]`) -> CenterNetOutput((B, HW, K), (B, HW, 2), (B, HW, 2)).
    """

    def __init__(self, in_channels: int, num_classes: int, head_channels: int = 64, prior_prob: float = 0.1,
                 in_index: int = 0) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 1 or head_channels < 1:
            raise ValueError(f"CenterNetHead needs positive in_channels, num_classes, head_channels; "
                             f"got {in_channels}, {num_classes}, {head_channels}")
        self.num_classes = num_classes
        self.num_anchors = 1
        self.in_index = in_index
        branch = partial(self._branch, in_channels, head_channels)
        self.heatmap, self.size, self.offset = branch(num_classes), branch(2), branch(2)
        nn.init.constant_(self.heatmap[-1].bias, prior_probability_bias(prior_prob))

    @staticmethod
    def _branch(in_channels: int, mid: int, out: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(in_channels, mid, 3, padding=1), nn.ReLU(), nn.Conv2d(mid, out, 1))

    def forward(self, feats: Sequence[Tensor]) -> CenterNetOutput:
        f = feats[self.in_index]
        return CenterNetOutput(_flatten(self.heatmap(f), self.num_classes), _flatten(self.size(f), 2),
                               _flatten(self.offset(f), 2))
