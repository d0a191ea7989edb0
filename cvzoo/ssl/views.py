"""Views of a batch for self-supervised methods: random augmentations on the device (kornia), two global
views (SimCLR, BYOL, ...) or global plus local crops (DINO's multi-crop). Images in [0, 1]."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cvzoo.augment._kornia import kornia_augmentation


def _size(name: str, value: int | Sequence[int]) -> tuple[int, int]:
    size = (value, value) if isinstance(value, int) else tuple(value)
    if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size):
        raise ValueError(f"{name} must be a positive int or an (H, W) pair, got {value!r}")
    return size  # type: ignore[return-value]


def ssl_augmentation(size: int | Sequence[int], *, scale: tuple[float, float] = (0.2, 1.0), hflip: bool = True,
                     color: float = 0.4, grayscale: float = 0.2, blur: float = 0.0, solarize: float = 0.0) -> nn.Module:
    """SimCLR's augmentation on a batch: random resized crop to `size`, flip, colour jitter (p 0.8), random
    grayscale, optional Gaussian blur and solarisation. (B, C, H, W) in [0, 1] -> (B, C, *size); each image
    draws its own parameters. Colour operations are skipped for 1-channel images."""
    ka = kornia_augmentation()
    size = _size("size", size)
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"scale must be (min, max) with 0 < min <= max <= 1, got {scale!r}")
    ops: list[nn.Module] = [ka.RandomResizedCrop(size, scale=scale, align_corners=False)]
    if hflip:
        ops.append(ka.RandomHorizontalFlip(p=0.5))
    return _Views(ops, [ka.ColorJitter(color, color, color, color / 4, p=0.8), ka.RandomGrayscale(p=grayscale)]
                  if color > 0 else [], [ka.RandomGaussianBlur((3, 3), (0.1, 2.0), p=blur)] if blur > 0 else [],
                  [ka.RandomSolarize(0.0, 0.0, p=solarize)] if solarize > 0 else [])


def byol_views(size: int | Sequence[int]) -> TwoViews:
    """BYOL's asymmetric pair (also Barlow Twins' and VICReg's): crops of 8-100%, blur with probability 1.0
    and 0.1, solarisation 0 and 0.2."""
    return TwoViews(ssl_augmentation(size, scale=(0.08, 1.0), blur=1.0),
                    ssl_augmentation(size, scale=(0.08, 1.0), blur=0.1, solarize=0.2))


class _Views(nn.Module):
    def __init__(self, geometric: list[nn.Module], colour: list[nn.Module], blur: list[nn.Module],
                 solarize: list[nn.Module]) -> None:
        super().__init__()
        self.geometric = nn.Sequential(*geometric)
        self.colour = nn.Sequential(*colour)
        self.rest = nn.Sequential(*blur, *solarize)
        # kornia keeps sampling constants as buffers (RandomSolarize's ranges): they follow .to(device) but
        # are not state, so a method's checkpoint does not depend on how its views were configured
        for module in self.modules():
            module._non_persistent_buffers_set.update(module._buffers)

    def forward(self, images: Tensor) -> Tensor:
        x = self.geometric(images)
        if images.shape[1] == 3:  # kornia's jitter and grayscale need RGB
            x = self.colour(x)
        return self.rest(x).clamp(0, 1)


class TwoViews(nn.Module):
    """(B, C, H, W) in [0, 1] -> [view1, view2], two independent augmentations (`first`, `second`; the second
    defaults to another draw of the first, BYOL uses different blur/solarisation probabilities)."""

    def __init__(self, first: nn.Module, second: nn.Module | None = None) -> None:
        super().__init__()
        self.first = first
        self.second = second if second is not None else first

    def forward(self, images: Tensor) -> list[Tensor]:
        return [self.first(images), self.second(images)]


class MultiCrop(nn.Module):
    """DINO's multi-crop: `num_global` crops of `global_size` (scale `global_scale`) and `num_local` crops of
    `local_size` (scale `local_scale`). (B, C, H, W) in [0, 1] -> [global views..., local views...]."""

    def __init__(self, global_size: int | Sequence[int], local_size: int | Sequence[int], *, num_global: int = 2,
                 num_local: int = 4, global_scale: tuple[float, float] = (0.4, 1.0),
                 local_scale: tuple[float, float] = (0.05, 0.4), hflip: bool = True) -> None:
        super().__init__()
        if isinstance(num_global, bool) or not isinstance(num_global, int) or num_global < 1:
            raise ValueError(f"num_global must be an int >= 1, got {num_global!r}")
        if isinstance(num_local, bool) or not isinstance(num_local, int) or num_local < 0:
            raise ValueError(f"num_local must be an int >= 0, got {num_local!r}")
        self.num_global, self.num_local = num_global, num_local
        self.global_view = ssl_augmentation(global_size, scale=global_scale, hflip=hflip)
        self.local_view = ssl_augmentation(local_size, scale=local_scale, hflip=hflip)

    def forward(self, images: Tensor) -> list[Tensor]:
        return [self.global_view(images) for _ in range(self.num_global)] + \
            [self.local_view(images) for _ in range(self.num_local)]


def denormalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Normalised (B, C, H, W) -> [0, 1] units (the inverse of `Signature.normalize`)."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return images * s + m
