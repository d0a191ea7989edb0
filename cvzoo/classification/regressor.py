"""Image regressor task model: backbone (+ optional neck) + regression head -> per-image values."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvzoo.classification.targets import check_value_targets
from cvzoo.heads import RegressionOutput
from cvzoo.types import Signature, cast_like_parameters


class ImageRegressor(nn.Module):
    """(B, C, H, W) normalised images -> values (B, num_outputs) (e.g. a price per image).

    `loss(images, values)` takes values (B, num_outputs) (or (B,) for one output) and returns
    {"loss": smooth-L1 (beta `beta`)}; `predict(images)` returns the values.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, neck: nn.Module | None = None, beta: float = 0.1) -> None:
        super().__init__()
        if not hasattr(head, "num_outputs"):
            raise ValueError(f"head must be a regression head with a num_outputs attribute, got {type(head).__name__}")
        if beta <= 0:
            raise ValueError(f"beta must be positive, got {beta}")
        self.backbone, self.neck, self.head = backbone, neck, head
        self.num_outputs = head.num_outputs
        self.beta = beta
        base: Signature = backbone.signature
        self.signature = base.replace(outputs=("values",))

    def forward(self, images: Tensor) -> RegressionOutput:
        feats = self.backbone(images)
        if self.neck is not None:
            feats = self.neck(feats)
        return self.head(feats)

    def loss(self, images: Tensor, values: Tensor) -> dict[str, Tensor]:
        images = cast_like_parameters(self.signature.validate(images), self)
        values = check_value_targets(values, (images.shape[0], self.num_outputs), "values")
        pred = self(images).values.float()  # float32 under autocast
        return {"loss": F.smooth_l1_loss(pred, values.float(), beta=self.beta)}

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        images = cast_like_parameters(self.signature.validate(images), self)
        return self(images).values
