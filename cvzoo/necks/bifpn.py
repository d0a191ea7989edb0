"""BiFPN (EfficientDet, Tan et al. 2020): repeated top-down + bottom-up fusion with fast normalised weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvzoo.layers import ActLayer, ConvNormAct, NormLayer, SeparableConvNormAct
from cvzoo.necks.resize import match_size
from cvzoo.types import FeatureInfo, check_feature_info, check_increasing_strides


class WeightedFusion(nn.Module):
    """Fast normalised fusion: sum_i relu(w_i) * x_i / (sum_i relu(w_i) + eps), then act and separable conv.

    [(B, C, H, W)] * n -> (B, C, H, W).
    """

    def __init__(self, num_inputs: int, channels: int, norm_layer: NormLayer | None, act_layer: ActLayer,
                 eps: float = 1e-4) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_inputs))
        self.eps = eps
        self.act = act_layer()
        self.conv = SeparableConvNormAct(channels, channels, 3, norm_layer=norm_layer)

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        w = F.relu(self.weight)
        w = w / (w.sum() + self.eps)
        fused = sum(w[i] * x for i, x in enumerate(inputs))
        return self.conv(self.act(fused))


class BiFPNLayer(nn.Module):
    """One bidirectional pass over L levels of equal channels. [(B, C, H_i, W_i)] * L -> same shapes."""

    def __init__(self, num_levels: int, channels: int, norm_layer: NormLayer | None, act_layer: ActLayer) -> None:
        super().__init__()
        self.top_down = nn.ModuleList(WeightedFusion(2, channels, norm_layer, act_layer)
                                      for _ in range(num_levels - 1))
        # inner levels fuse three inputs (input, top-down, bottom-up); the top level two
        self.bottom_up = nn.ModuleList(WeightedFusion(3 if i < num_levels - 1 else 2, channels, norm_layer, act_layer)
                                       for i in range(1, num_levels))

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        n = len(feats)
        td = [feats[-1]]
        for i in range(n - 2, -1, -1):  # top-down: td_i = fuse(P_i, up(td_{i+1}))
            up = F.interpolate(td[0], size=feats[i].shape[-2:], mode="nearest")
            td.insert(0, self.top_down[i]([feats[i], up]))
        out = [td[0]]
        for i in range(1, n):  # bottom-up: out_i = fuse(P_i, td_i, down(out_{i-1})), top level without td
            down = match_size(F.max_pool2d(out[-1], 3, 2, 1), feats[i])
            inputs = [feats[i], td[i], down] if i < n - 1 else [feats[i], down]
            out.append(self.bottom_up[i - 1](inputs))
        return out


class BiFPN(nn.Module):
    """[(B, C_i, H_i, W_i)] high-res first -> [(B, out_channels, H_i, W_i)] + `extra_levels` coarser maps.

    Inputs are projected to `out_channels` by 1x1 conv + norm; extra levels are max-pooled from the
    projected last input (EfficientDet's P6, P7); then `num_repeats` BiFPN layers run. Input strides
    must strictly increase: the bottom-up path max-pools by 2 from one level to the next.
    """

    def __init__(
        self,
        feature_info: Sequence[FeatureInfo],
        out_channels: int = 64,
        num_repeats: int = 3,
        extra_levels: int = 2,
        norm_layer: NormLayer | None = nn.BatchNorm2d,
        act_layer: ActLayer = nn.SiLU,
    ) -> None:
        super().__init__()
        info = check_feature_info(feature_info)
        check_increasing_strides(info, owner="BiFPN")
        if out_channels < 1 or num_repeats < 1 or extra_levels < 0:
            raise ValueError(f"BiFPN needs out_channels >= 1, num_repeats >= 1, extra_levels >= 0; got "
                             f"out_channels={out_channels}, num_repeats={num_repeats}, extra_levels={extra_levels}")
        if len(info) + extra_levels < 2:
            raise ValueError(f"BiFPN needs at least two levels, got {len(info)} inputs and extra_levels={extra_levels}")
        self.input_proj = nn.ModuleList(
            ConvNormAct(f.channels, out_channels, 1, norm_layer=norm_layer, act_layer=None) for f in info
        )
        self.extra_levels = extra_levels
        self.layers = nn.Sequential(
            *(BiFPNLayer(len(info) + extra_levels, out_channels, norm_layer, act_layer) for _ in range(num_repeats))
        )
        self.feature_info = tuple(FeatureInfo(out_channels, f.stride) for f in info) + tuple(
            FeatureInfo(out_channels, info[-1].stride * 2 ** (i + 1)) for i in range(extra_levels)
        )

    @property
    def num_levels(self) -> int:
        return len(self.feature_info)

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        x = [proj(f) for proj, f in zip(self.input_proj, feats)]
        for _ in range(self.extra_levels):
            x.append(F.max_pool2d(x[-1], 3, 2, 1))
        for layer in self.layers:
            x = layer(x)
        return x
