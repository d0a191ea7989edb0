"""Cutout, CutMix and MixUp for classification batches.

CutMix and MixUp are written here rather than taken from kornia: kornia's RandomCutMixV2 / RandomMixUpV2 accept
only hard (B,) labels and return (label_a, label_b, lambda) rows, while these take hard (B,) or soft (B, K)
labels and return the mixed soft labels (B, K) directly, with CutMix weighted by the area actually pasted.

Each image is mixed with its neighbour in the batch (image i with image i - 1, `roll`), so a shuffled loader
gives random pairs and no image is paired with itself (for B > 1). Every image draws its own mixing coefficient.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cvzoo.augment._kornia import kornia_augmentation
from cvzoo.augment._targets import check_images, check_unit_interval


def soft_labels(labels: Tensor, num_classes: int, batch: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """int64 (B,) class ids or (B, K) soft labels -> (B, K) float soft labels; ValueError on a bad shape or id."""
    if not isinstance(labels, Tensor):
        raise ValueError(f"labels must be a tensor (B,) or (B, K), got {type(labels).__name__}")
    if labels.ndim == 1 and labels.shape[0] == batch and not labels.is_floating_point():
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(
                f"labels must be class ids in [0, {num_classes}), got min {int(labels.min())} max {int(labels.max())}"
            )
        return torch.nn.functional.one_hot(labels.long(), num_classes).to(dtype)
    if labels.ndim == 2 and labels.shape == (batch, num_classes):
        return labels.to(dtype)
    raise ValueError(
        f"labels must be int (B,) or (B, K) with B={batch}, K={num_classes}, got {tuple(labels.shape)} {labels.dtype}"
    )


def _check_mix_args(alpha: float, num_classes: int, p: float) -> None:
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    check_unit_interval("p", p)


def sample_beta(alpha: float, n: int, device: torch.device) -> Tensor:
    """(n,) float32 draws of Beta(alpha, alpha) from torch's generator (so `torch.manual_seed` fixes them)."""
    conc = torch.full((n,), float(alpha), device=device)
    return torch.distributions.Beta(conc, conc).sample()


class MixUp(nn.Module):
    """MixUp (Zhang et al. 2018): x = lam * x_i + (1 - lam) * x_{i-1}, y = lam * y_i + (1 - lam) * y_{i-1}.

    (B, C, H, W), labels (B,) int or (B, K) -> (B, C, H, W), (B, K) float soft labels. lam ~ Beta(alpha, alpha)
    per image; an image left unmixed (probability 1 - p) has lam = 1.
    """

    def __init__(self, alpha: float = 0.2, *, num_classes: int, p: float = 1.0) -> None:
        super().__init__()
        _check_mix_args(alpha, num_classes, p)
        self.alpha, self.num_classes, self.p = float(alpha), num_classes, float(p)

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, H, W), (B,) int or (B, K) -> (B, C, H, W), (B, K) float."""
        check_images(images)
        b = images.shape[0]
        y = soft_labels(labels, self.num_classes, b)  # (B, K)
        lam = sample_beta(self.alpha, b, images.device)  # (B,)
        lam = torch.where(torch.rand(b, device=images.device) < self.p, lam, torch.ones_like(lam))
        lam_img = lam.to(images.dtype)[:, None, None, None]
        mixed = lam_img * images + (1 - lam_img) * images.roll(1, 0)
        return mixed, lam[:, None] * y + (1 - lam[:, None]) * y.roll(1, 0)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, num_classes={self.num_classes}, p={self.p}"


class CutMix(nn.Module):
    """CutMix (Yun et al. 2019): a box of image i - 1 pasted into image i, labels weighted by the pasted area.

    (B, C, H, W), labels (B,) int or (B, K) -> (B, C, H, W), (B, K) float soft labels. Per image lam ~
    Beta(alpha, alpha) sets the box sides (H, W) * sqrt(1 - lam) (rounded) around a uniform random centre; the box
    is clipped to the image, and the label weight of the pasted image is the clipped box area / (H * W), i.e.
    exactly the fraction of pixels replaced. An image left unmixed (probability 1 - p) keeps its label.
    """

    def __init__(self, alpha: float = 1.0, *, num_classes: int, p: float = 1.0) -> None:
        super().__init__()
        _check_mix_args(alpha, num_classes, p)
        self.alpha, self.num_classes, self.p = float(alpha), num_classes, float(p)

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, H, W), (B,) int or (B, K) -> (B, C, H, W), (B, K) float."""
        check_images(images)
        b, _, h, w = images.shape
        dev = images.device
        y = soft_labels(labels, self.num_classes, b)  # (B, K)
        cut = (1 - sample_beta(self.alpha, b, dev)).sqrt()  # (B,) side fraction
        cut = torch.where(torch.rand(b, device=dev) < self.p, cut, torch.zeros_like(cut))
        cut_h, cut_w = (cut * h).round().long(), (cut * w).round().long()
        cy, cx = (torch.rand(b, device=dev) * h).long(), (torch.rand(b, device=dev) * w).long()
        y1, y2 = (cy - cut_h // 2).clamp(0, h), (cy - cut_h // 2 + cut_h).clamp(0, h)  # clipped to the image
        x1, x2 = (cx - cut_w // 2).clamp(0, w), (cx - cut_w // 2 + cut_w).clamp(0, w)
        rows = torch.arange(h, device=dev)
        cols = torch.arange(w, device=dev)
        in_rows = (rows >= y1[:, None]) & (rows < y2[:, None])  # (B, H)
        in_cols = (cols >= x1[:, None]) & (cols < x2[:, None])  # (B, W)
        box = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # (B, 1, H, W)
        mixed = torch.where(box, images.roll(1, 0), images)
        pasted = ((y2 - y1) * (x2 - x1)).float() / (h * w)  # (B,) fraction of pixels replaced
        lam = (1 - pasted)[:, None]
        return mixed, lam * y + (1 - lam) * y.roll(1, 0)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, num_classes={self.num_classes}, p={self.p}"


class Cutout(nn.Module):
    """Cutout / random erasing (kornia RandomErasing): (B, C, H, W) -> (B, C, H, W), labels pass through.

    With probability `p` per image, one rectangle of area fraction in `scale` and aspect ratio (w / h) in `ratio`,
    lying inside the image, is filled with `value`.
    """

    def __init__(
        self,
        *,
        scale: tuple[float, float] = (0.02, 0.33),
        ratio: tuple[float, float] = (0.3, 3.3),
        value: float = 0.0,
        p: float = 0.5,
    ) -> None:
        super().__init__()
        if not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale must be (min, max) with 0 < min <= max <= 1, got {scale!r}")
        if not (len(ratio) == 2 and 0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must be (min, max) with 0 < min <= max, got {ratio!r}")
        check_unit_interval("p", p)
        ka = kornia_augmentation()
        self.erase = ka.RandomErasing(scale=scale, ratio=ratio, value=float(value), p=p)

    def forward(self, images: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(B, C, H, W), any labels -> (B, C, H, W), the same labels."""
        check_images(images)
        return self.erase(images), labels
