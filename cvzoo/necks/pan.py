"""Path Aggregation Network neck (PANet, Liu et al. 2018): FPN top-down, then a bottom-up path."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from cvzoo.layers import ActLayer, ConvNormAct, NormLayer
from cvzoo.necks.fpn import FPN, ExtraLevels
from cvzoo.necks.resize import match_size
from cvzoo.types import FeatureInfo, check_feature_info, check_increasing_strides


class PAN(nn.Module):
    """[(B, C_i, H_i, W_i)] high-res first -> [(B, out_channels, H_i, W_i)] (+ extra levels).

    N_0 = P_0; N_{i+1} = conv3x3(P_{i+1} + conv3x3_stride2(N_i)), as MMDetection's PAFPN. Extra
    levels (max-pool or convs on the last output) come after the bottom-up path. Input strides must
    strictly increase: the bottom-up path halves the resolution from one level to the next.
    """

    def __init__(
        self,
        feature_info: Sequence[FeatureInfo],
        out_channels: int = 256,
        extra_levels: int = 0,
        extra_mode: str = "conv",
        norm_layer: NormLayer | None = nn.BatchNorm2d,
        act_layer: ActLayer | None = nn.ReLU,
    ) -> None:
        super().__init__()
        check_increasing_strides(check_feature_info(feature_info), owner="PAN")
        if extra_levels < 0:
            raise ValueError(f"extra_levels must be >= 0, got {extra_levels}")
        if extra_mode not in ("conv", "maxpool"):
            raise ValueError(f"extra_mode must be 'conv' or 'maxpool', got {extra_mode!r}")
        self.fpn = FPN(feature_info, out_channels, norm_layer=norm_layer, act_layer=act_layer)
        n = len(self.fpn.feature_info)
        self.downsample = nn.ModuleList(
            ConvNormAct(out_channels, out_channels, 3, 2, norm_layer=norm_layer, act_layer=act_layer)
            for _ in range(n - 1)
        )
        self.fuse = nn.ModuleList(
            ConvNormAct(out_channels, out_channels, 3, norm_layer=norm_layer, act_layer=act_layer)
            for _ in range(n - 1)
        )
        self.extra = ExtraLevels(out_channels, out_channels, extra_levels, extra_mode) if extra_levels else None
        last = self.fpn.feature_info[-1].stride
        self.feature_info = self.fpn.feature_info + tuple(
            FeatureInfo(out_channels, last * 2 ** (i + 1)) for i in range(extra_levels)
        )

    @property
    def num_levels(self) -> int:
        return len(self.feature_info)

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        p = self.fpn(feats)
        out = [p[0]]
        for down, fuse, lateral in zip(self.downsample, self.fuse, p[1:]):  # bottom-up
            out.append(fuse(lateral + match_size(down(out[-1]), lateral)))
        if self.extra is not None:
            out.extend(self.extra(out[-1]))
        return out
