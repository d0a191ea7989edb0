"""Digits: scikit-learn's bundled 8 x 8 handwritten digits (1,797 images, no download) as a classification set."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from cvzoo._optional import require
from cvzoo.data.info import DatasetInfo

DIGIT_CLASSES = tuple(str(d) for d in range(10))
DIGITS_SPLITS = ("train", "test")


def stratified_split(labels: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices (train, test) of a seeded split keeping each class's share. (N,) int64 -> sorted index tensors.

    Each class `c` with `n_c` items sends `round(test_fraction * n_c)` of them, chosen by a permutation
    drawn from `torch.Generator().manual_seed(seed)`, to the test split.
    """
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(labels).tolist():  # ten classes: a loop over classes, not items
        idx = (labels == c).nonzero(as_tuple=True)[0]
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = round(test_fraction * len(idx))
        test.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


class Digits(Dataset):
    """scikit-learn's `load_digits` split into train/test: `(image (channels, S, S) float32 in [0, 1], label)`.

    The 8 x 8 images hold counts 0..16; they are divided by 16 and resized to `image_size` (bilinear,
    `align_corners=False`, no antialiasing; `image_size=8` keeps the raw values), then replicated to 3
    channels when `channels=3`. The split is stratified and seeded (see `stratified_split`). Labels are
    int64 0-d tensors. Needs scikit-learn (`pip install 'cvzoo[data]'`).
    """

    def __init__(self, split: str = "train", image_size: int = 32, channels: int = 1, test_fraction: float = 0.2,
                 seed: int = 0) -> None:
        if split not in DIGITS_SPLITS:
            raise ValueError(f"split must be one of {DIGITS_SPLITS}, got {split!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        datasets = require("sklearn.datasets", "data", "the Digits dataset")
        raw = datasets.load_digits()
        images = torch.from_numpy(raw.images).float() / 16.0  # (1797, 8, 8)
        labels = torch.from_numpy(raw.target).long()
        train, test = stratified_split(labels, test_fraction, seed)
        keep = train if split == "train" else test
        images = images[keep, None]  # (N, 1, 8, 8)
        if image_size != 8:
            images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False,
                                   antialias=False)
        self.images = images.expand(-1, channels, -1, -1).contiguous()  # (N, channels, S, S)
        self.labels = labels[keep]  # (N,)
        self.indices = keep  # rows of sklearn's arrays
        self.split = split
        self.info = DatasetInfo(name="digits", task="classification", classes=DIGIT_CLASSES, in_channels=channels,
                                image_size=(image_size, image_size), target_fields=("label",))

    @property
    def classes(self) -> tuple[str, ...]:
        return DIGIT_CLASSES

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index].clone(), self.labels[index].clone()
