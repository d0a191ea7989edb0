"""The structure-blind baseline a generative model must beat: independent Gaussian pixels."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cvzoo.types import Signature


def check_image_batch(images: object, signature: Signature, image_size: int, name: str = "images") -> Tensor:
    """`signature.validate(images)` plus the fixed square size a generative model works at."""
    images = signature.validate(images, name)
    if tuple(images.shape[-2:]) != (image_size, image_size):
        raise ValueError(f"{name} of size {images.shape[-2]}x{images.shape[-1]} do not match the model's "
                         f"image_size={image_size}; expected {image_size}x{image_size}")
    return images


def check_sample_labels(labels: object, num_samples: int, num_classes: int | None,
                        conditional_only: bool = True) -> Tensor | None:
    """Validates `sample(num_samples, labels=...)`'s labels: (num_samples,) integers in [0, num_classes)."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    if labels is None:
        if num_classes is not None and conditional_only:
            raise ValueError(f"labels are required: this model is class-conditional ({num_classes} classes); pass "
                             f"labels=torch.tensor([...]) with {num_samples} class indices")
        return None
    if num_classes is None:
        raise ValueError("labels were given to an unconditional model (num_classes is None)")
    if not isinstance(labels, Tensor) or labels.shape != (num_samples,) or labels.is_floating_point():
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a ({num_samples},) integer tensor, one class per sample, got {shape}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got values from {int(labels.min())} to "
                         f"{int(labels.max())}")
    return labels.long()


class PixelGaussian(nn.Module):
    """Every pixel an independent Gaussian (one per class with `num_classes`): it learns the mean image and
    the per-pixel spread, and nothing of strokes or shapes. The floor every generative model must clear.

    `loss(images, labels)` is the Gaussian negative log-likelihood per pixel (in nats, images normalised to
    [-1, 1]); `sample(n, labels=...)` draws from it. `forward(labels)` returns (mean, log_std) (B, C, S, S).
    """

    def __init__(self, *, image_size: int = 16, in_channels: int = 1, num_classes: int | None = None) -> None:
        super().__init__()
        for name, value in (("image_size", image_size), ("in_channels", in_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 1):
            raise ValueError(f"num_classes must be a positive integer or None, got {num_classes!r}")
        self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes
        groups = num_classes or 1
        self.mean = nn.Parameter(torch.zeros(groups, in_channels, image_size, image_size))
        self.log_std = nn.Parameter(torch.zeros(groups, in_channels, image_size, image_size))
        self.signature = Signature(in_channels=in_channels, mean=(0.5,) * in_channels, std=(0.5,) * in_channels,
                                   outputs=("mean", "log_std"))

    def forward(self, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(B,) class indices (or None: the single unconditional Gaussian) -> (mean, log_std), (B, C, S, S)."""
        if labels is None or self.num_classes is None:
            return self.mean[:1], self.log_std[:1]
        return self.mean[labels], self.log_std[labels]

    def loss(self, images: Tensor, targets: Tensor | None = None) -> dict[str, Tensor]:
        images = check_image_batch(images, self.signature, self.image_size)
        if self.num_classes is not None and targets is None:
            raise ValueError("targets (class labels) are required by a class-conditional PixelGaussian")
        mean, log_std = self(targets if self.num_classes is not None else None)
        z = (images.float() - mean) * torch.exp(-log_std)
        nll = (0.5 * z.square() + log_std + 0.5 * math.log(2 * math.pi)).mean()
        return {"loss": nll}

    @torch.no_grad()
    def sample(self, num_samples: int, *, labels: Tensor | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        labels = check_sample_labels(labels, num_samples, self.num_classes)
        if labels is not None:
            labels = labels.to(self.mean.device)
        mean, log_std = self(labels)
        shape = (num_samples, self.in_channels, self.image_size, self.image_size)
        noise = torch.randn(shape, generator=generator, device=self.mean.device)
        return ((mean + log_std.exp() * noise) * 0.5 + 0.5).clamp(0, 1)
