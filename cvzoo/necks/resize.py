"""Resizing between pyramid levels that tolerates odd sizes."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def match_size(x: Tensor, like: Tensor) -> Tensor:
    """Nearest-resizes `x` to `like`'s spatial size when they differ (a stride-2 op on an odd size rounds
    differently from the backbone's own downsampling). (B, C, h, w) -> (B, C, H, W)."""
    if x.shape[-2:] == like.shape[-2:]:
        return x
    return F.interpolate(x, size=like.shape[-2:], mode="nearest")
