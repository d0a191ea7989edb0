"""Baselines that never look at the image: what a model must beat to have learnt anything.

`NoopClassifier` learns the class prior, `NoopRegressor` the mean target, `NoopMultiTask` both for
each task of a `MultiTaskModel`. They follow the task-model contract (`forward`, `loss`, `predict`,
`signature`), so they train, evaluate and predict through the same code as real models.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvzoo.classification.classifier import ClassificationPrediction
from cvzoo.classification.targets import check_class_targets, check_value_targets
from cvzoo.heads import ClassificationOutput, RegressionOutput
from cvzoo.types import Signature


def _batch_size(images: Tensor, signature: Signature) -> int:
    return signature.validate(images).shape[0]


class NoopClassifier(nn.Module):
    """(B, C, H, W) -> the same learnt logits (B, num_classes) for every image: the class prior."""

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.logits = nn.Parameter(torch.zeros(num_classes))
        self.signature = Signature(in_channels=in_channels, mean=(0.5,) * in_channels, std=(0.25,) * in_channels,
                                   outputs=("logits",))

    def forward(self, images: Tensor) -> ClassificationOutput:
        # repeat, not expand: outputs are not views of the parameter (a later in-place update would change them)
        return ClassificationOutput(self.logits.repeat(_batch_size(images, self.signature), 1))

    def loss(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        labels = check_class_targets(labels, images.shape[0], self.num_classes)
        return {"loss": F.cross_entropy(self(images).logits.float(), labels)}

    @torch.no_grad()
    def predict(self, images: Tensor) -> ClassificationPrediction:
        return ClassificationPrediction.from_logits(self(images).logits)


class NoopRegressor(nn.Module):
    """(B, C, H, W) -> the same learnt values (B, num_outputs) for every image: the target mean (L2 loss)."""

    def __init__(self, num_outputs: int = 1, in_channels: int = 3) -> None:
        super().__init__()
        if num_outputs < 1:
            raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
        self.num_outputs = num_outputs
        self.value = nn.Parameter(torch.zeros(num_outputs))
        self.signature = Signature(in_channels=in_channels, mean=(0.5,) * in_channels, std=(0.25,) * in_channels,
                                   outputs=("values",))

    def forward(self, images: Tensor) -> RegressionOutput:
        return RegressionOutput(self.value.repeat(_batch_size(images, self.signature), 1))

    def loss(self, images: Tensor, values: Tensor) -> dict[str, Tensor]:
        values = check_value_targets(values, (images.shape[0], self.num_outputs), "values")
        return {"loss": F.mse_loss(self(images).values.float(), values.float())}

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        return self(images).values


class NoopMultiTask(nn.Module):
    """The image-blind baseline of `MultiTaskModel`'s shapes targets: {"label": class prior,
    "value": mean value (B, 1), "keypoints": mean normalised points (B, K, 2)}."""

    def __init__(self, num_classes: int = 4, num_keypoints: int = 4, in_channels: int = 3) -> None:
        super().__init__()
        self.label = NoopClassifier(num_classes, in_channels)
        self.value = NoopRegressor(1, in_channels)
        self.keypoints = nn.Parameter(torch.full((num_keypoints, 2), 0.5))
        self.tasks = ("label", "value", "keypoints")
        self.signature = Signature(in_channels=in_channels, mean=(0.5,) * in_channels, std=(0.25,) * in_channels,
                                   outputs=self.tasks)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        b = _batch_size(images, self.signature)
        return {"label": self.label(images).logits, "value": self.value(images).values,
                "keypoints": self.keypoints.repeat(b, 1, 1)}

    def loss(self, images: Tensor, targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
        missing = {"label", "value", "keypoints"} - set(targets)
        if missing:
            raise ValueError(f"targets lack {sorted(missing)}; expected keys label, value, keypoints")
        out = self(images)
        losses = {"label": F.cross_entropy(out["label"].float(), targets["label"]),
                  "value": F.mse_loss(out["value"].float(), targets["value"].float().reshape(out["value"].shape)),
                  "keypoints": F.l1_loss(out["keypoints"].float(), targets["keypoints"].float())}
        losses["loss"] = losses["label"] + losses["value"] + losses["keypoints"]
        return losses

    @torch.no_grad()
    def predict(self, images: Tensor) -> dict[str, object]:
        out = self(images)
        return {"label": ClassificationPrediction.from_logits(out["label"]), "value": out["value"],
                "keypoints": out["keypoints"]}
