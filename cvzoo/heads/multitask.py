"""Several named heads on one set of feature maps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from torch import Tensor, nn


class MultiTaskHead(nn.Module):
    """Named heads run on the same features. [(B, C, H, W)] -> {name: that head's output NamedTuple}."""

    def __init__(self, heads: Mapping[str, nn.Module]) -> None:
        super().__init__()
        if not heads:
            raise ValueError("heads must name at least one head, got an empty mapping")
        bad = [k for k in heads if not (isinstance(k, str) and k.isidentifier())]
        if bad:
            raise ValueError(f"head names must be Python identifiers, got {bad!r}")
        self.heads = nn.ModuleDict(heads)

    def forward(self, feats: Sequence[Tensor]) -> dict[str, NamedTuple]:
        return {name: head(feats) for name, head in self.heads.items()}
