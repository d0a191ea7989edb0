"""Validation of image-level targets at the public boundary of the classification task models."""

from __future__ import annotations

import torch
from torch import Tensor


def _reads_data() -> bool:
    # range and finiteness checks read values (a host-device sync); skipped while torch.compile traces
    return not torch.compiler.is_compiling()


def check_class_targets(labels: object, batch: int, num_classes: int, name: str = "labels") -> Tensor:
    """Class indices (B,) in [0, num_classes), or class probabilities (B, num_classes) (MixUp/CutMix)."""
    if not isinstance(labels, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of class indices with shape ({batch},), "
                         f"got {type(labels).__name__}")
    if labels.is_floating_point():
        if tuple(labels.shape) != (batch, num_classes):
            raise ValueError(f"{name} with floating dtype are class probabilities and must have shape "
                             f"({batch}, {num_classes}), got {tuple(labels.shape)}")
        if _reads_data() and not bool(torch.isfinite(labels).all()):
            raise ValueError(f"{name} contains NaN or inf values")
        return labels
    if labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"{name} has dtype {labels.dtype}; expected an integer dtype (class indices)")
    if tuple(labels.shape) != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) to match the batch of images, got {tuple(labels.shape)}")
    if _reads_data() and batch and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{name} must lie in [0, {num_classes}), got values from {int(labels.min())} "
                         f"to {int(labels.max())}")
    return labels.long()  # cross_entropy takes int64 indices only


def check_value_targets(values: object, expected_shape: tuple[int, ...], name: str) -> Tensor:
    """Real-valued targets (regression values, normalised keypoints) of a fixed shape, finite."""
    if not isinstance(values, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {expected_shape}, got {type(values).__name__}")
    if not values.is_floating_point():
        raise ValueError(f"{name} has dtype {values.dtype}; expected a floating dtype")
    if tuple(values.shape) != expected_shape:
        if expected_shape[1:] != (1,) or tuple(values.shape) != expected_shape[:1]:
            raise ValueError(f"{name} must have shape {expected_shape}, got {tuple(values.shape)}")
        values = values[:, None]  # (B,) for a single regression output -> (B, 1)
    if _reads_data() and not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name} contains NaN or inf values")
    return values

