"""Global pooling of the feature map a non-dense head reads."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

POOLS = ("avg", "max", "avgmax")


class GlobalPool(nn.Module):
    """Picks `feats[in_index]` and pools it. [(B, C, H, W)] -> (B, C) ("avgmax": mean of both, as timm)."""

    def __init__(self, pool: str = "avg", in_index: int = -1) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self.pool = pool
        self.in_index = in_index

    def forward(self, feats: Sequence[Tensor] | Tensor) -> Tensor:
        x = feats if isinstance(feats, Tensor) else feats[self.in_index]
        if self.pool == "avg":
            return x.mean(dim=(2, 3))
        if self.pool == "max":
            return torch.amax(x, dim=(2, 3))
        return 0.5 * (x.mean(dim=(2, 3)) + torch.amax(x, dim=(2, 3)))
