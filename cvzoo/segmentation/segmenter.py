"""The semantic segmentation task model: backbone (-> neck) -> head (+ auxiliary head), logits at input size."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvzoo.segmentation.losses import dice_loss, lovasz_softmax_loss
from cvzoo.types import cast_like_parameters


class SegmentationOutput(NamedTuple):
    logits: Tensor  # (B, K, H, W) at the input size
    aux_logits: Tensor | None  # (B, K, H, W) from the auxiliary head, None without one


class SegmentationPrediction(NamedTuple):
    labels: Tensor  # (B, H, W) int64 argmax class per pixel
    probs: Tensor  # (B, K, H, W) softmax probabilities


class Segmenter(nn.Module):
    """backbone -> neck (optional) -> head, and an optional auxiliary head on the same features.

    - `forward(images)` -> SegmentationOutput: logits upsampled (bilinear, `interpolate(size=...)`) to the
      input size, so odd sizes round-trip;
    - `loss(images, targets)`: targets (B, H, W) int64 labels in [0, num_classes) or `ignore_index`;
      cross-entropy (ignored pixels left out) + `aux_weight` x the auxiliary head's cross-entropy +
      `dice_weight` x soft Dice + `lovasz_weight` x Lovasz-softmax; {"loss", "ce", "aux", "dice", "lovasz"}
      (the terms that are on);
    - `predict(images)` -> SegmentationPrediction(labels (B, H, W), probs (B, K, H, W)).
    Images are normalised with `signature` (cvzoo models do not normalise internally).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, neck: nn.Module | None = None,
                 aux_head: nn.Module | None = None, aux_weight: float = 0.5, ignore_index: int = 255,
                 dice_weight: float = 0.0, lovasz_weight: float = 0.0) -> None:
        super().__init__()
        if not hasattr(head, "num_classes"):
            raise ValueError(f"head must be a segmentation head with a num_classes attribute, got "
                             f"{type(head).__name__}")
        if aux_head is not None and getattr(aux_head, "num_classes", None) != head.num_classes:
            raise ValueError(f"aux_head predicts {getattr(aux_head, 'num_classes', None)} classes but head "
                             f"{head.num_classes}")
        for name, value in (("aux_weight", aux_weight), ("dice_weight", dice_weight),
                            ("lovasz_weight", lovasz_weight)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if 0 <= ignore_index < head.num_classes:
            raise ValueError(f"ignore_index={ignore_index} is a class index (num_classes={head.num_classes}); use "
                             "a value outside [0, num_classes), e.g. 255 or -100")
        self.backbone = backbone
        self.neck = neck
        self.head = head
        self.aux_head = aux_head
        self.num_classes = head.num_classes
        self.aux_weight = aux_weight
        self.ignore_index = ignore_index
        self.dice_weight = dice_weight
        self.lovasz_weight = lovasz_weight
        self.signature = backbone.signature.replace(outputs=SegmentationOutput._fields)

    @classmethod
    def from_torchvision(cls, tv_model: nn.Module) -> Segmenter:
        """torchvision `fcn_resnet50`, `deeplabv3_resnet50` or `lraspp_mobilenet_v3_large` -> a Segmenter with
        the same weights (and auxiliary head when the model has one)."""
        from cvzoo.segmentation.torchvision_interop import segmenter_from_torchvision

        return segmenter_from_torchvision(tv_model)

    def forward(self, images: Tensor) -> SegmentationOutput:
        size = images.shape[-2:]
        feats = self.backbone(images)
        if self.neck is not None:
            feats = self.neck(feats)
        logits = F.interpolate(self.head(feats), size=size, mode="bilinear", align_corners=False)
        aux = None
        if self.aux_head is not None:
            aux = F.interpolate(self.aux_head(feats), size=size, mode="bilinear", align_corners=False)
        return SegmentationOutput(logits, aux)

    def check_targets(self, targets: Tensor, images: Tensor) -> Tensor:
        """ValueErrors naming the image index for a target of the wrong size or dtype or with labels outside
        [0, num_classes) other than ignore_index. Value checks need the data (a synchronisation); under
        torch.compile only the static shape and dtype checks run."""
        if not isinstance(targets, Tensor):
            raise ValueError(f"targets must be a (B, H, W) int64 tensor of class indices, got {type(targets).__name__}")
        b, _, h, w = images.shape
        if targets.ndim != 3 or targets.shape[0] != b:
            raise ValueError(f"targets must be ({b}, {h}, {w}) class indices, got shape {tuple(targets.shape)}")
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise ValueError(f"targets must hold integer class indices, got dtype {targets.dtype}")
        if tuple(targets.shape[1:]) != (h, w):
            raise ValueError(f"targets[0] has size {tuple(targets.shape[1:])} but the images are {(h, w)}; every "
                             "target must match its image's size")
        targets = targets.long()
        if not torch.compiler.is_compiling():
            bad = ((targets < 0) | (targets >= self.num_classes)) & (targets != self.ignore_index)
            if bool(bad.any()):
                i = int(bad.flatten(1).any(dim=1).nonzero()[0, 0])
                value = int(targets[i][bad[i]][0])
                raise ValueError(f"targets[{i}] holds label {value}; expected 0 <= label < num_classes="
                                 f"{self.num_classes} or ignore_index={self.ignore_index}")
        return targets

    def loss(self, images: Tensor, targets: Tensor) -> dict[str, Tensor]:
        images = cast_like_parameters(self.signature.validate(images), self)
        targets = self.check_targets(targets, images)
        out = self(images)
        logits = out.logits.float()  # log-probabilities in float32 under autocast
        # summed over the valid pixels / their count: the mean of torchvision's cross_entropy, but an image
        # set with every pixel ignored gives 0 and zero gradients, not 0 / 0
        num_valid = (targets != self.ignore_index).sum().clamp(min=1)
        losses = {"ce": F.cross_entropy(logits, targets, ignore_index=self.ignore_index, reduction="sum") / num_valid}
        total = losses["ce"]
        if out.aux_logits is not None and self.aux_weight > 0:
            losses["aux"] = F.cross_entropy(out.aux_logits.float(), targets, ignore_index=self.ignore_index,
                                            reduction="sum") / num_valid
            total = total + self.aux_weight * losses["aux"]
        if self.dice_weight > 0:
            losses["dice"] = dice_loss(logits, targets, self.ignore_index)
            total = total + self.dice_weight * losses["dice"]
        if self.lovasz_weight > 0:
            losses["lovasz"] = lovasz_softmax_loss(logits, targets, self.ignore_index)
            total = total + self.lovasz_weight * losses["lovasz"]
        losses["loss"] = total
        return losses

    @torch.no_grad()
    def predict(self, images: Tensor) -> SegmentationPrediction:
        images = cast_like_parameters(self.signature.validate(images), self)
        probs = torch.softmax(self(images).logits.float(), dim=1)
        return SegmentationPrediction(probs.argmax(dim=1), probs)
