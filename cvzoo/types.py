"""Shared types on the ground floor: pyramid metadata and what a model takes and returns."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FeatureInfo(NamedTuple):
    channels: int
    stride: int  # total downsampling w.r.t. the input image


def level_names(feature_info: Sequence[FeatureInfo], prefix: str) -> tuple[str, ...]:
    """Names a pyramid by log2 of each stride: strides (8, 16, 32) with prefix "p" -> ("p3", "p4", "p5").

    Names are unique: a stride already named gets a suffix "_<n>", n counting its occurrences from 2,
    so a dilated backbone's strides (4, 8, 8, 8) with prefix "c" -> ("c2", "c3", "c3_2", "c3_3").
    """
    names, seen = [], {}
    for f in feature_info:
        seen[f.stride] = seen.get(f.stride, 0) + 1
        base = f"{prefix}{round(math.log2(f.stride))}"
        names.append(base if seen[f.stride] == 1 else f"{base}_{seen[f.stride]}")
    return tuple(names)


def check_feature_info(feature_info: Sequence[FeatureInfo], name: str = "feature_info") -> tuple[FeatureInfo, ...]:
    """Validates pyramid metadata handed to a constructor: non-empty, positive, strides non-decreasing.

    Strides may repeat (a dilated backbone returns several maps at its output stride, e.g. ResNet's
    layer3 and layer4 both at stride 8); a part that needs distinct strides checks that itself.
    """
    info = tuple(FeatureInfo(*f) for f in feature_info)
    if not info:
        raise ValueError(f"{name} must list at least one level, got {feature_info!r}")
    for f in info:
        if f.channels < 1 or f.stride < 1:
            raise ValueError(f"{name} needs positive channels and strides, got {f}")
    if any(b.stride < a.stride for a, b in zip(info, info[1:])):
        raise ValueError(f"{name} strides must not decrease (high resolution first; equal strides are allowed "
                         f"for dilated stages), got {[f.stride for f in info]}")
    return info


def check_increasing_strides(info: Sequence[FeatureInfo], name: str = "feature_info", owner: str = "") -> None:
    """For parts whose levels must differ in resolution (a stride-2 path between consecutive levels):
    raises a ValueError unless strides strictly increase."""
    strides = [f.stride for f in info]
    if any(b <= a for a, b in zip(strides, strides[1:])):
        who = f"{owner} " if owner else ""
        raise ValueError(f"{who}{name} strides must strictly increase (each level coarser than the one before), "
                         f"got {strides}")


def cast_like_parameters(images: Tensor, module: torch.nn.Module) -> Tensor:
    """Floating images in the module's parameter dtype (float64 input to a float32 model just works)."""
    param = next(module.parameters(), None)
    return images if param is None or images.dtype == param.dtype else images.to(param.dtype)


@dataclasses.dataclass(frozen=True)
class Signature:
    """What a model takes and returns, kept apart from the arguments that shape its internals.

    Images are `(B, in_channels, H, W)` floating tensors normalised with `mean`/`std` (in [0, 1] units),
    with `H, W >= min_size` and both divisible by `size_divisor`.
    """

    in_channels: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    size_divisor: int = 1
    min_size: int = 1
    dtype: torch.dtype = torch.float32
    outputs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.in_channels != 3 and (self.mean, self.std) == (IMAGENET_MEAN, IMAGENET_STD):
            # the default statistics, averaged over RGB, one value per channel (as timm does for in_chans=1)
            object.__setattr__(self, "mean", (sum(IMAGENET_MEAN) / 3,) * self.in_channels)
            object.__setattr__(self, "std", (sum(IMAGENET_STD) / 3,) * self.in_channels)
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError(f"mean and std need one value per input channel ({self.in_channels}), got mean "
                             f"{self.mean} and std {self.std}")

    def replace(self, **changes) -> Signature:
        return dataclasses.replace(self, **changes)

    def normalize(self, images: Tensor) -> Tensor:
        """Images in [0, 1] -> normalised with this signature's mean and std. (B, C, H, W) -> same."""
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
        return (images - mean) / std

    def validate(self, images: object, name: str = "images") -> Tensor:
        """Raises a ValueError naming `name`, the value and the expectation for input this model cannot take.

        Shape and dtype checks are static; the finiteness check reads data, so it is skipped while
        torch.compile traces (it would force a graph break and a host-device sync).
        """
        if not isinstance(images, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape (B, {self.in_channels}, H, W), "
                             f"got {type(images).__name__}")
        if images.ndim != 4:
            raise ValueError(f"{name} must be 4-D (B, {self.in_channels}, H, W), got shape {tuple(images.shape)}")
        b, c, h, w = images.shape
        if b == 0:
            raise ValueError(f"{name} is an empty batch (shape {tuple(images.shape)}); expected at least one image")
        if c != self.in_channels:
            raise ValueError(f"{name} has {c} channels (shape {tuple(images.shape)}); "
                             f"expected {self.in_channels}")
        if not images.is_floating_point():
            raise ValueError(f"{name} has dtype {images.dtype}; expected a floating dtype such as {self.dtype} "
                             "(convert integer images with images.float() / 255 and normalise them)")
        if h < self.min_size or w < self.min_size:
            raise ValueError(f"{name} of size {h}x{w} is too small; expected H and W >= {self.min_size} "
                             "(the deepest feature stride)")
        if self.size_divisor > 1 and (h % self.size_divisor or w % self.size_divisor):
            raise ValueError(f"{name} of size {h}x{w} is not divisible by size_divisor={self.size_divisor}")
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(images).all()):
            raise ValueError(f"{name} contains NaN or inf values; expected finite pixel values")
        return images
