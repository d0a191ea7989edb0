"""Argument checks and the pooled-feature read shared by the adapt task models."""

from __future__ import annotations

from torch import Tensor, nn


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def pooled_features(backbone: nn.Module, images: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, D): the backbone's last feature map averaged over space."""
    return backbone(images)[-1].mean((2, 3))
