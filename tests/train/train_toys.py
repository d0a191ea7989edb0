"""Tiny models and data for the trainer tests (imported by the tests and by the subprocess scripts)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


class TinyNet(nn.Module):
    """(B, 3, 8, 8) -> (B, num_classes) logits: conv, norm, ReLU, global pool, (dropout), linear.

    `loss(images, labels)` -> {"loss": ce + 0.01 * l2 of the logits, "ce": ..., "logit_l2": ...}.
    `norm="group"` keeps samples independent (needed where micro-batch gradients must add up to the big batch's).
    """

    def __init__(self, num_classes: int = 4, norm: str = "batch", dropout: float = 0.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8) if norm == "batch" else nn.GroupNorm(2, 8)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.norm(self.conv(x)))
        return self.fc(self.drop(x.mean(dim=(2, 3))))

    def loss(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        logits = self(images).float()
        ce = F.cross_entropy(logits, labels)
        l2 = logits.pow(2).mean()
        return {"loss": ce + 0.01 * l2, "ce": ce, "logit_l2": l2}


def toy_data(n: int = 24, num_classes: int = 4, seed: int = 0) -> TensorDataset:
    """Learnable images: the class shifts the mean of one colour channel."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    images = torch.randn(n, 3, 8, 8, generator=g) * 0.5
    images[:, 0] += labels[:, None, None].float() - num_classes / 2
    return TensorDataset(images, labels)


def toy_loader(n: int = 24, batch_size: int = 4, shuffle: bool = False, seed: int = 0) -> DataLoader:
    return DataLoader(toy_data(n, seed=seed), batch_size=batch_size, shuffle=shuffle)


def sgd(lr: float = 1.0, momentum: float = 0.0):
    """An optimizer factory for SGD; without momentum the update is exactly -lr * grad, so parameters reveal
    gradients."""
    return lambda model: torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)


def reference_sgd_step(model: nn.Module, batches: list[tuple[Tensor, Tensor]], lr: float = 1.0) -> dict[str, Tensor]:
    """Parameters after one SGD step on the mean loss over the concatenation of `batches` (plain autograd)."""
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    model.zero_grad()
    model.loss(images, labels)["loss"].backward()
    with torch.no_grad():
        return {n: p - lr * p.grad for n, p in model.named_parameters()}
