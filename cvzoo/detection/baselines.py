"""`NoopDetector`: a detector that never looks at the image, the floor a real detector must clear.

It learns, per class, how likely the class is to appear in an image (a logit) and where its boxes
lie on average (one box in relative coordinates), and predicts that one box per class for every image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvzoo.detection.structures import Detections, TargetBatch
from cvzoo.types import Signature


class NoopDetectorOutput(NamedTuple):
    presence: Tensor  # (B, K) logits that each class appears in the image
    boxes: Tensor  # (B, K, 4) xyxy in each image's pixels: the class's mean box


class NoopDetector(nn.Module):
    """Image-blind detector: `predict` returns, for each class, its mean box scaled to the image with
    score sigmoid(presence logit), whatever the pixels. Same `loss`/`predict` convention as the dense
    detectors: images (B, C, H, W) or a list of (C, H_i, W_i), torchvision-style targets."""

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.presence = nn.Parameter(torch.zeros(num_classes))  # logit that the class is in an image
        self.box = nn.Parameter(torch.tensor([[-1.0, -1.0, 1.0, 1.0]]).repeat(num_classes, 1))  # sigmoid -> rel xyxy
        self.signature = Signature(in_channels=in_channels, mean=(0.5,) * in_channels, std=(0.25,) * in_channels,
                                   outputs=("presence", "boxes"))

    def _sizes(self, images: Tensor | Sequence[Tensor]) -> Tensor:
        """(B, 2) (H, W) of each image, after validating it."""
        if isinstance(images, Tensor):
            b, _, h, w = self.signature.validate(images).shape
            return torch.tensor([[h, w]] * b, dtype=torch.float32, device=self.presence.device)
        if not images:
            raise ValueError("images is an empty list; expected at least one (C, H, W) image")
        for i, img in enumerate(images):
            if not isinstance(img, Tensor) or img.ndim != 3:
                raise ValueError(f"images[{i}] must be a (C, H, W) tensor, got "
                                 f"{tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__}")
        return torch.tensor([list(img.shape[-2:]) for img in images], dtype=torch.float32, device=self.presence.device)

    def forward(self, images: Tensor | Sequence[Tensor]) -> NoopDetectorOutput:
        """-> presence logits (B, K), boxes (B, K, 4) xyxy in each image's pixels."""
        sizes = self._sizes(images)
        scale = sizes[:, None, [1, 0, 1, 0]]  # (B, 1, 4) W H W H
        rel = torch.sigmoid(self.box)
        rel = torch.cat([torch.minimum(rel[:, :2], rel[:, 2:]), torch.maximum(rel[:, :2], rel[:, 2:])], dim=-1)
        return NoopDetectorOutput(self.presence.repeat(sizes.shape[0], 1), rel[None] * scale)

    def loss(self, images: Tensor | Sequence[Tensor],
             targets: Sequence[Mapping[str, Tensor]] | TargetBatch) -> dict[str, Tensor]:
        logits, boxes = self(images)
        b = logits.shape[0]
        if isinstance(targets, TargetBatch):
            if targets.boxes.shape[0] != b:
                raise ValueError(f"targets hold {targets.boxes.shape[0]} images but there are {b} images")
            tb = targets
        else:
            tb = TargetBatch.from_list(targets, b, self.num_classes, logits.device)
        onehot = F.one_hot(tb.labels.clamp(min=0), self.num_classes).float() * tb.valid[..., None]  # (B, M, K)
        present = onehot.amax(dim=1)  # (B, K)
        cls = F.binary_cross_entropy_with_logits(logits.float(), present)
        # L1 between each ground-truth box and its class's box, relative to the image size
        scale = self._sizes(images)[:, None, [1, 0, 1, 0]]
        pred = torch.einsum("bmk,bkc->bmc", onehot, boxes)  # (B, M, 4): the box of each target's class
        l1 = ((pred - tb.boxes).abs() / scale).sum(-1) * tb.valid
        box = l1.sum() / tb.valid.sum().clamp(min=1)
        return {"loss": cls + box, "classification": cls, "box_regression": box}

    @torch.no_grad()
    def predict(self, images: Tensor | Sequence[Tensor], score_thresh: float = 0.0, **_: object) -> list[Detections]:
        logits, boxes = self(images)
        scores = torch.sigmoid(logits)
        labels = torch.arange(self.num_classes, device=scores.device)
        out = []
        for s, bx in zip(scores, boxes):  # B small lists of K rows: the result type is per image
            keep = s > score_thresh
            order = torch.argsort(s[keep], descending=True)
            out.append(Detections(bx[keep][order], s[keep][order], labels[keep][order]))
        return out
