"""Segmentation metrics through torchmetrics: mean IoU, per-class IoU, pixel accuracy (ignored pixels left out)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from cvzoo._optional import require


class SegmentationMetrics:
    """Accumulates (B, H, W) predicted and target labels; `compute()` -> {"mIoU", "pixel_accuracy",
    "IoU/<class>"}. mIoU averages the IoU of the classes present in the predictions or the targets (a class
    absent from both has no IoU and does not count), as torchmetrics' MulticlassJaccardIndex does."""

    def __init__(self, num_classes: int, ignore_index: int = 255, class_names: Sequence[str] | None = None) -> None:
        classification = require("torchmetrics.classification", "metrics", "segmentation metrics")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names but num_classes={num_classes}")
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        self.iou = classification.MulticlassJaccardIndex(num_classes, average="none", ignore_index=ignore_index,
                                                         validate_args=False)
        self.accuracy = classification.MulticlassAccuracy(num_classes, average="micro", ignore_index=ignore_index,
                                                          validate_args=False)
        self.seen = torch.zeros(num_classes, dtype=torch.bool)
        self.ignore_index = ignore_index

    def update(self, preds: Tensor, targets: Tensor) -> None:
        preds, targets = preds.detach().cpu().long(), targets.detach().cpu().long()
        if preds.shape != targets.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and targets {tuple(targets.shape)} must have the same shape")
        valid = targets != self.ignore_index
        self.seen |= torch.bincount(targets[valid], minlength=self.num_classes)[:self.num_classes] > 0
        self.seen |= torch.bincount(preds[valid], minlength=self.num_classes)[:self.num_classes] > 0
        self.iou.update(preds, targets)
        self.accuracy.update(preds, targets)

    def compute(self) -> dict[str, float]:
        per_class = self.iou.compute()
        out = {"mIoU": float(per_class[self.seen].mean()) if self.seen.any() else 0.0,
               "pixel_accuracy": float(self.accuracy.compute())}
        out.update({f"IoU/{name}": float(v) if seen else float("nan")
                    for name, v, seen in zip(self.class_names, per_class.tolist(), self.seen.tolist())})
        return out


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]],
                          device: torch.device | str | None = None,
                          class_names: Sequence[str] | None = None) -> dict[str, float]:
    """Runs `model.predict` over (normalised images, (B, H, W) labels) batches -> `SegmentationMetrics.compute()`."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    metrics = SegmentationMetrics(model.num_classes, getattr(model, "ignore_index", 255), class_names)
    try:
        for images, targets in loader:
            metrics.update(model.predict(images.to(device)).labels, targets)
    finally:
        model.train(was_training)
    return metrics.compute()
