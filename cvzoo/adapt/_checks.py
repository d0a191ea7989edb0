"""Argument checks and the pooled-feature read shared by the adapt task models."""

from __future__ import annotations

from torch import Tensor, nn

from cvzoo.types import Signature


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_backbone(backbone: object, owner: str) -> int:
    """The channels of a cvzoo backbone's last feature map (what `pooled_features` returns)."""
    info = getattr(backbone, "feature_info", None)
    if not isinstance(backbone, nn.Module) or not info or not isinstance(getattr(backbone, "signature", None),
                                                                         Signature):
        raise ValueError(f"{owner} needs a backbone: an nn.Module with `feature_info` and a `signature` "
                         f"(cvzoo.backbones), got {type(backbone).__name__}")
    return int(info[-1].channels)


def pooled_features(backbone: nn.Module, images: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, D): the backbone's last feature map averaged over space."""
    return backbone(images)[-1].mean((2, 3))
