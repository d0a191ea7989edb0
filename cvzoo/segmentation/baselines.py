"""The image-blind segmentation baseline: what a segmenter must beat to have learnt anything."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvzoo.segmentation.segmenter import SegmentationOutput, SegmentationPrediction, Segmenter
from cvzoo.types import Signature


class NoopSegmenter(nn.Module):
    """(B, C, H, W) -> the same learnt class logits at every pixel of every image: trained by cross-entropy
    it learns the pixel class prior and predicts the majority class everywhere. Same contract as Segmenter
    (targets (B, H, W) with `ignore_index` left out)."""

    def __init__(self, num_classes: int, in_channels: int = 3, ignore_index: int = 255) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index={ignore_index} is a class index (num_classes={num_classes})")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.logits = nn.Parameter(torch.zeros(num_classes))
        self.signature = Signature(in_channels=in_channels, mean=(0.5,) * in_channels, std=(0.25,) * in_channels,
                                   outputs=SegmentationOutput._fields)

    def forward(self, images: Tensor) -> SegmentationOutput:
        self.signature.validate(images)
        b, _, h, w = images.shape
        # repeat, not expand: outputs are not views of the parameter
        return SegmentationOutput(self.logits[None, :, None, None].repeat(b, 1, h, w), None)

    check_targets = Segmenter.check_targets

    def loss(self, images: Tensor, targets: Tensor) -> dict[str, Tensor]:
        targets = self.check_targets(targets, images)
        num_valid = (targets != self.ignore_index).sum().clamp(min=1)
        ce = F.cross_entropy(self(images).logits.float(), targets, ignore_index=self.ignore_index,
                             reduction="sum") / num_valid
        return {"loss": ce, "ce": ce}

    @torch.no_grad()
    def predict(self, images: Tensor) -> SegmentationPrediction:
        probs = torch.softmax(self(images).logits.float(), dim=1)
        return SegmentationPrediction(probs.argmax(dim=1), probs)
