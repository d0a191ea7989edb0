"""Image classifier task model: backbone (+ optional neck) + classification head."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvzoo.classification.targets import check_class_targets
from cvzoo.heads import ClassificationOutput
from cvzoo.types import Signature, cast_like_parameters


class ClassificationPrediction(NamedTuple):
    labels: Tensor  # (B,) argmax class
    scores: Tensor  # (B,) probability of that class
    probs: Tensor  # (B, num_classes) softmax

    @classmethod
    def from_logits(cls, logits: Tensor) -> ClassificationPrediction:
        """(B, num_classes) logits -> softmax in float32, argmax labels and their probabilities."""
        probs = logits.float().softmax(dim=-1)
        scores, labels = probs.max(dim=-1)
        return cls(labels, scores, probs)


class ImageClassifier(nn.Module):
    """(B, C, H, W) normalised images -> class logits (B, num_classes).

    `forward` returns the head's raw `ClassificationOutput`; `loss(images, labels)` returns
    {"loss": cross entropy} for class indices (B,) or class probabilities (B, K); `predict(images)`
    returns labels, scores and probabilities. Inputs are checked against `signature`.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, neck: nn.Module | None = None,
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not hasattr(head, "num_classes"):
            raise ValueError(f"head must be a classification head with a num_classes attribute, "
                             f"got {type(head).__name__}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        self.backbone = backbone
        self.neck = neck
        self.head = head
        self.num_classes = head.num_classes
        self.label_smoothing = label_smoothing
        base: Signature = backbone.signature
        self.signature = base.replace(outputs=("logits",))

    def forward(self, images: Tensor) -> ClassificationOutput:
        feats = self.backbone(images)
        if self.neck is not None:
            feats = self.neck(feats)
        return self.head(feats)

    def features(self, images: Tensor) -> Tensor:
        """(B, C, H, W) normalised images -> the pooled features (B, D) the classifier's linear layer reads
        (embeddings for k-NN, Frechet distances, probes)."""
        feats = self.backbone(images)
        if self.neck is not None:
            feats = self.neck(feats)
        return self.head.features(feats)

    def loss(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        images = cast_like_parameters(self.signature.validate(images), self)
        labels = check_class_targets(labels, images.shape[0], self.num_classes)
        logits = self(images).logits.float()  # log-probabilities in float32 under autocast
        ce = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        return {"loss": ce}

    @torch.no_grad()
    def predict(self, images: Tensor) -> ClassificationPrediction:
        images = cast_like_parameters(self.signature.validate(images), self)
        return ClassificationPrediction.from_logits(self(images).logits)
