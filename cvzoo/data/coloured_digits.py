"""Coloured digits: the Digits set with a spurious cue. Each digit is drawn in a colour that, in training,
matches its class most of the time (`correlation`) and is random otherwise; held-out images get colours
independent of the class. A model that reads the colour instead of the shape fails on them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.data import Dataset

from cvzoo.data.digits import DIGIT_CLASSES, Digits
from cvzoo.data.info import DatasetInfo

# ten hues a tenth of the colour circle apart, all with the same channel sum (R + G + B = 1.5): the colour is
# in the ratios between channels only, so a model that adds the channels up is colour-blind, and a model that
# reads the colour has chosen to
COLOURS = torch.tensor([[0.5 + 0.5 * math.cos(2 * math.pi * (i / 10 - c / 3)) for c in range(3)]
                        for i in range(10)], dtype=torch.float32)  # (10, 3)


class ColouredDigits(Dataset):
    """`(image (3, S, S) float32 in [0, 1], {"label": digit, "colour": colour index})`.

    The stroke of each grey digit (see `Digits`) is painted in one of ten colours (`COLOURS`) on black. The
    colour of image i is its class's colour with probability `correlation`, else one of the ten drawn
    uniformly (so it can still be the class's); draws are seeded and fixed per image. The default
    `correlation` is 0.95 for "train" and 0 for "test" (colour independent of the class).
    """

    def __init__(self, split: str = "train", image_size: int = 32, correlation: float | None = None,
                 test_fraction: float = 0.2, seed: int = 0) -> None:
        if correlation is None:
            correlation = 0.95 if split == "train" else 0.0
        if isinstance(correlation, bool) or not isinstance(correlation, (int, float)) or not 0.0 <= correlation <= 1.0:
            raise ValueError(f"correlation must be a number in [0, 1], got {correlation!r}")
        digits = Digits(split=split, image_size=image_size, channels=1, test_fraction=test_fraction, seed=seed)
        g = torch.Generator().manual_seed(seed + (0 if split == "train" else 1))
        labels = digits.labels
        keep = torch.rand(len(labels), generator=g) < correlation
        random_colour = torch.randint(0, len(COLOURS), (len(labels),), generator=g)
        self.colours = torch.where(keep, labels, random_colour)  # (N,)
        self.images = (digits.images * COLOURS[self.colours][:, :, None, None]).contiguous()  # (N, 3, S, S)
        self.labels = labels
        self.correlation = float(correlation)
        self.split = split
        self.info = DatasetInfo(name="coloured-digits", task="debiasing", classes=DIGIT_CLASSES, in_channels=3,
                                image_size=(image_size, image_size), target_fields=("label", "colour"))

    @property
    def classes(self) -> tuple[str, ...]:
        return DIGIT_CLASSES

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        return self.images[index].clone(), {"label": self.labels[index].clone(),
                                            "colour": self.colours[index].clone()}
