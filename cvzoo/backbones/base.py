"""What every backbone shares: declared pyramid metadata, stage freezing, gradient checkpointing."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from cvzoo.types import IMAGENET_MEAN, IMAGENET_STD, FeatureInfo, Signature, check_feature_info, level_names


class Backbone(nn.Module):
    """Image -> feature maps. (B, C, H, W) -> [(B, C_i, H / s_i, W / s_i)], high resolution first.

    Subclasses set `feature_info` and `signature` in `__init__` (through `_declare`) and list their
    freezable parts, stem first, in `frozen_stage_modules()`.
    """

    feature_info: tuple[FeatureInfo, ...]
    signature: Signature

    def __init__(self) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.frozen_stages = -1

    def _declare(
        self,
        feature_info: Sequence[FeatureInfo],
        in_channels: int,
        size_divisor: int = 1,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        self.feature_info = check_feature_info(feature_info, f"{type(self).__name__}.feature_info")
        self.signature = Signature(
            in_channels=in_channels,
            mean=mean,
            std=std,
            size_divisor=size_divisor,
            min_size=max(size_divisor, self.feature_info[-1].stride),
            outputs=level_names(self.feature_info, "c"),
        )

    @property
    def num_levels(self) -> int:
        return len(self.feature_info)

    def frozen_stage_modules(self) -> list[nn.Module]:
        """[stem, stage 0, stage 1, ...]: what `freeze_stages(n)` freezes the first n + 1 of."""
        raise NotImplementedError(f"{type(self).__name__} does not support freeze_stages")

    def freeze_stages(self, num_stages: int) -> None:
        """Freezes the stem and the first `num_stages` stages (-1: nothing, 0: the stem only).

        Frozen parameters get `requires_grad=False` and frozen norm layers stay in eval mode through
        `train()`, so their running statistics do not drift (mmdet's `frozen_stages` + `norm_eval`).
        """
        parts = self.frozen_stage_modules()
        if not -1 <= num_stages < len(parts):
            raise ValueError(f"frozen_stages must lie in [-1, {len(parts) - 1}] for {type(self).__name__}, "
                             f"got {num_stages}")
        self.frozen_stages = num_stages
        for i, part in enumerate(parts):
            for p in part.parameters():
                p.requires_grad_(i > num_stages)
        self.train(self.training)

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        if self.frozen_stages >= 0:
            for part in self.frozen_stage_modules()[: self.frozen_stages + 1]:
                part.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute stage activations in backward instead of storing them (less memory, ~30% more compute)."""
        self.grad_checkpointing = enable

    def forward(self, x: Tensor) -> list[Tensor]:
        raise NotImplementedError


def last_map_channels(backbone: object, owner: str) -> int:
    """The channels of a backbone's last feature map (what task models pool); a ValueError naming `owner` when
    `backbone` is not a cvzoo backbone (an nn.Module with `feature_info` and a `signature`)."""
    info = getattr(backbone, "feature_info", None)
    if not isinstance(backbone, nn.Module) or not info or not isinstance(getattr(backbone, "signature", None),
                                                                         Signature):
        raise ValueError(f"{owner} needs a backbone: an nn.Module with `feature_info` and a `signature` "
                         f"(cvzoo.backbones), got {type(backbone).__name__}")
    return int(info[-1].channels)


def check_out_indices(out_indices: Sequence[int], num_stages: int, owner: str) -> tuple[int, ...]:
    """Validates stage indices (0-based, increasing, within range) given to a backbone constructor."""
    idx = tuple(int(i) for i in out_indices)
    if not idx or any(not 0 <= i < num_stages for i in idx) or list(idx) != sorted(set(idx)):
        raise ValueError(f"{owner}: out_indices must be increasing stage indices in [0, {num_stages - 1}], "
                         f"got {tuple(out_indices)!r}")
    return idx
