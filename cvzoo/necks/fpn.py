"""Feature Pyramid Network (Lin et al. 2017), with RetinaNet/FCOS-style extra levels."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from cvzoo.layers import ActLayer, ConvNormAct, NormLayer, init_conv_kaiming_uniform_
from cvzoo.types import FeatureInfo, check_feature_info


class ExtraLevels(nn.Module):
    """Coarser levels on top of a pyramid: each halves the previous one (P6, P7 in RetinaNet/FCOS).

    mode "conv": 3x3 stride-2 convs, a ReLU between them (torchvision's LastLevelP6P7);
    mode "maxpool": 1x1 max-pool with stride 2 (Faster R-CNN's P6, no parameters).
    (B, C_src, H, W) -> [(B, out_channels, H/2, W/2), (B, out_channels, H/4, W/4), ...].
    """

    def __init__(self, in_channels: int, out_channels: int, num_levels: int, mode: str = "conv") -> None:
        super().__init__()
        if mode not in ("conv", "maxpool"):
            raise ValueError(f"extra_mode must be 'conv' or 'maxpool', got {mode!r}")
        if num_levels < 0:
            raise ValueError(f"extra_levels must be >= 0, got {num_levels}")
        if mode == "maxpool" and in_channels != out_channels:
            raise ValueError(f"extra_mode='maxpool' keeps channels, so it needs the source to have "
                             f"out_channels={out_channels} channels, got {in_channels}")
        self.mode = mode
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, 2, 1)
            for i in range(num_levels if mode == "conv" else 0)
        )
        self.num_levels = num_levels
        init_conv_kaiming_uniform_(self)

    def forward(self, x: Tensor) -> list[Tensor]:
        out = []
        if self.mode == "maxpool":
            for _ in range(self.num_levels):
                x = F.max_pool2d(x, 1, 2)
                out.append(x)
            return out
        for i, conv in enumerate(self.convs):
            x = conv(F.relu(x) if i > 0 else x)
            out.append(x)
        return out


class FPN(nn.Module):
    """[(B, C_i, H_i, W_i)] high-res first -> [(B, out_channels, H_i, W_i)] + `extra_levels` coarser maps.

    Without extra levels and norm it is torchvision's `FeaturePyramidNetwork`: 1x1 laterals, nearest
    top-down upsampling to the lateral's size (odd sizes work), 3x3 smoothing. `extra_source` picks
    what the extra levels are computed from: "output" (P5, as FCOS and RetinaNet v2 do) or "input"
    (C5, as the original RetinaNet). `num_outputs` keeps only the first (finest) n top-down levels,
    e.g. 1 for a single stride-4/8 map for CenterNet; it cannot be combined with extra levels.
    Strides may repeat (a dilated backbone's layer3 and layer4 at stride 8): equal-size levels are
    summed top-down as they are.
    """

    def __init__(
        self,
        feature_info: Sequence[FeatureInfo],
        out_channels: int = 256,
        extra_levels: int = 0,
        extra_source: str = "output",
        extra_mode: str = "conv",
        norm_layer: NormLayer | None = None,
        act_layer: ActLayer | None = None,
        num_outputs: int | None = None,
    ) -> None:
        super().__init__()
        info = check_feature_info(feature_info)
        num_outputs = len(info) if num_outputs is None else num_outputs
        if not 1 <= num_outputs <= len(info):
            raise ValueError(f"num_outputs must lie in [1, {len(info)}], got {num_outputs}")
        if num_outputs < len(info) and extra_levels:
            raise ValueError(f"num_outputs={num_outputs} drops the coarse levels that extra_levels={extra_levels} "
                             "would be built on; use one or the other")
        if out_channels < 1:
            raise ValueError(f"out_channels must be positive, got {out_channels}")
        if extra_levels < 0:
            raise ValueError(f"extra_levels must be >= 0, got {extra_levels}")
        if extra_source not in ("input", "output"):
            raise ValueError(f"extra_source must be 'input' or 'output', got {extra_source!r}")
        if extra_mode not in ("conv", "maxpool"):
            raise ValueError(f"extra_mode must be 'conv' or 'maxpool', got {extra_mode!r}")
        self.lateral = nn.ModuleList(
            ConvNormAct(f.channels, out_channels, 1, norm_layer=norm_layer, act_layer=act_layer) for f in info
        )
        self.smooth = nn.ModuleList(
            ConvNormAct(out_channels, out_channels, 3, norm_layer=norm_layer, act_layer=act_layer)
            for _ in range(num_outputs)
        )
        self.extra_source = extra_source
        self.extra = (
            ExtraLevels(info[-1].channels if extra_source == "input" else out_channels, out_channels,
                        extra_levels, extra_mode)
            if extra_levels else None
        )
        init_conv_kaiming_uniform_(self)
        self.feature_info = tuple(FeatureInfo(out_channels, f.stride) for f in info[:num_outputs]) + tuple(
            FeatureInfo(out_channels, info[-1].stride * 2 ** (i + 1)) for i in range(extra_levels)
        )

    @property
    def num_levels(self) -> int:
        return len(self.feature_info)

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        lat = [conv(f) for conv, f in zip(self.lateral, feats)]
        for i in range(len(lat) - 1, 0, -1):  # top-down; size= keeps odd inputs working
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
        out = [conv(x) for conv, x in zip(self.smooth, lat)]
        if self.extra is not None:
            out.extend(self.extra(feats[-1] if self.extra_source == "input" else out[-1]))
        return out
