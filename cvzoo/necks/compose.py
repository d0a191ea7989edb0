"""A backbone followed by a neck, exposing the neck's pyramid as one feature extractor."""

from __future__ import annotations

from torch import Tensor, nn

from cvzoo.types import level_names


class BackboneWithNeck(nn.Module):
    """(B, C, H, W) -> [(B, C_i, H / s_i, W / s_i)] at the neck's levels.

    Reads only public attributes: the backbone's `signature`, the neck's `feature_info`.
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.feature_info = neck.feature_info
        # min_size stays the backbone's: extra levels beyond it shrink to 1x1 maps rather than fail
        self.signature = backbone.signature.replace(outputs=level_names(self.feature_info, "p"))

    @property
    def num_levels(self) -> int:
        return len(self.feature_info)

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.neck(self.backbone(x))
