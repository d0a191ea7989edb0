"""Image-level classification head."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from torch import Tensor, nn

from cvzoo.heads.pooling import GlobalPool


class ClassificationOutput(NamedTuple):
    logits: Tensor  # (B, num_classes)


class ClassificationHead(nn.Module):
    """Global pool -> dropout -> linear. [(B, C, H, W)] (reads `feats[in_index]`) -> logits (B, num_classes)."""

    def __init__(self, in_channels: int, num_classes: int, pool: str = "avg", dropout: float = 0.0,
                 in_index: int = -1) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be positive, got {in_channels}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.num_classes = num_classes
        self.pool = GlobalPool(pool, in_index)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_classes)

    def features(self, feats: Sequence[Tensor] | Tensor) -> Tensor:
        """The pooled features the linear layer reads: [(B, C, H, W)] -> (B, C)."""
        return self.pool(feats)

    def forward(self, feats: Sequence[Tensor] | Tensor) -> ClassificationOutput:
        return ClassificationOutput(self.fc(self.dropout(self.features(feats))))
