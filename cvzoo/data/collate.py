"""Batching samples for a DataLoader: detection targets stay a list of dicts, images stack when they can."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import default_collate


def detection_collate(batch: Sequence[tuple[Tensor, dict[str, Tensor]]]
                      ) -> tuple[Tensor | list[Tensor], list[dict[str, Tensor]]]:
    """[(image (C, H, W), target dict)] -> (images, targets).

    `images` is one (B, C, H, W) tensor when every image has the same shape, else the list of images
    (pad or resize them in the model's transform); `targets` is the list of target dicts, the
    torchvision-style format detectors take.
    """
    if len(batch) == 0:
        raise ValueError("batch must hold at least one (image, target) sample, got an empty batch")
    images, targets = [], []
    for i, sample in enumerate(batch):
        if not (isinstance(sample, Sequence) and len(sample) == 2 and isinstance(sample[0], Tensor)):
            raise ValueError(f"batch[{i}] must be an (image tensor, target dict) pair, got {type(sample).__name__}")
        images.append(sample[0])
        targets.append(sample[1])
    if all(im.shape == images[0].shape for im in images):
        return torch.stack(images), targets
    return images, targets


def classification_collate(batch: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """[(image (C, H, W), label 0-d)] -> (images (B, C, H, W), labels (B,)): torch's default collate."""
    return default_collate(batch)


def segmentation_collate(batch: Sequence[tuple[Tensor, Tensor]], ignore_index: int = 255) -> tuple[Tensor, Tensor]:
    """[(image (C, H_i, W_i), mask (H_i, W_i))] -> (images (B, C, H, W), masks (B, H, W) int64), H, W the largest
    sizes: smaller images are zero-padded at the bottom/right and their masks padded with `ignore_index`, so
    the padding is left out of losses and metrics."""
    if len(batch) == 0:
        raise ValueError("batch must hold at least one (image, mask) sample, got an empty batch")
    for i, sample in enumerate(batch):
        if not (isinstance(sample, Sequence) and len(sample) == 2 and isinstance(sample[0], Tensor)
                and isinstance(sample[1], Tensor) and sample[1].shape == sample[0].shape[-2:]):
            got = (f"image {tuple(sample[0].shape)} and mask {tuple(sample[1].shape)}"
                   if isinstance(sample, Sequence) and len(sample) == 2 and all(isinstance(t, Tensor) for t in sample)
                   else type(sample).__name__)
            raise ValueError(f"batch[{i}] must be an (image (C, H, W), mask (H, W)) pair of tensors of the same "
                             f"size, got {got}")
    h = max(im.shape[-2] for im, _ in batch)
    w = max(im.shape[-1] for im, _ in batch)
    images = torch.stack([torch.nn.functional.pad(im, (0, w - im.shape[-1], 0, h - im.shape[-2])) for im, _ in batch])
    masks = torch.stack([torch.nn.functional.pad(m.long(), (0, w - m.shape[-1], 0, h - m.shape[-2]),
                                                 value=ignore_index) for _, m in batch])
    return images, masks
