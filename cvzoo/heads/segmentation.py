"""Semantic segmentation heads: feature maps -> per-pixel class logits at the resolution of one level.

Each head takes the backbone's (or neck's) list of maps, high resolution first, reads the level(s) it is
built for, and returns (B, num_classes, H_s, W_s) logits at the stride of its output level; the task
model (`cvzoo.segmentation.Segmenter`) upsamples them to the input size. Upsampling inside heads uses
`interpolate(size=...)`, so odd input sizes work. Layer layouts follow torchvision's FCN, DeepLabV3 and
LR-ASPP heads (weights copy one to one), panoptic FPN's semantic branch and U-Net.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvzoo.layers import ConvNormAct, NormLayer
from cvzoo.types import FeatureInfo, check_feature_info


def _check(name: str, **values: int) -> None:
    bad = {k: v for k, v in values.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
    if bad:
        raise ValueError(f"{name} needs positive integers, got " + ", ".join(f"{k}={v!r}" for k, v in bad.items()))


def _level(feats: Sequence[Tensor], index: int, channels: int, name: str) -> Tensor:
    if not -len(feats) <= index < len(feats):
        raise ValueError(f"{name} reads level {index} but got {len(feats)} feature maps")
    x = feats[index]
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"{name} expects level {index} with {channels} channels, got shape {tuple(x.shape)}")
    return x


def _upsample(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class FCNHead(nn.Sequential):
    """FCN head (Long et al. 2015, torchvision's FCNHead): 3x3 conv to in_channels / 4, norm, ReLU, dropout,
    1x1 conv to the classes, on level `in_index`. [(B, C_l, H_l, W_l)] -> (B, K, H_i, W_i)."""

    def __init__(self, in_channels: int, num_classes: int, in_index: int = -1, dropout: float = 0.1,
                 norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        _check("FCNHead", in_channels=in_channels, num_classes=num_classes)
        inter = max(1, in_channels // 4)
        super().__init__(nn.Conv2d(in_channels, inter, 3, padding=1, bias=False), norm_layer(inter), nn.ReLU(),
                         nn.Dropout(dropout), nn.Conv2d(inter, num_classes, 1))
        self.in_channels, self.num_classes, self.in_index = in_channels, num_classes, in_index

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        return super().forward(_level(feats, self.in_index, self.in_channels, "FCNHead"))


class ASPPPooling(nn.Module):
    """Image-level features of ASPP: global average, 1x1 conv, norm, ReLU, broadcast back to the map size."""

    def __init__(self, in_channels: int, channels: int, norm_layer: NormLayer) -> None:
        super().__init__()
        self.conv = ConvNormAct(in_channels, channels, 1, norm_layer=norm_layer)

    def forward(self, x: Tensor) -> Tensor:
        return _upsample(self.conv(F.adaptive_avg_pool2d(x, 1)), x.shape[-2:])


class ASPPHead(nn.Module):
    """DeepLabV3 head (Chen et al. 2017, torchvision's DeepLabHead): atrous spatial pyramid pooling (a 1x1
    conv, one 3x3 conv per atrous rate, image pooling; concatenated and projected, dropout 0.5), then a 3x3
    conv and a 1x1 conv to the classes, on level `in_index` (stride 8 or 16 with a dilated backbone).
    [(B, C_l, H_l, W_l)] -> (B, K, H_i, W_i)."""

    def __init__(self, in_channels: int, num_classes: int, atrous_rates: Sequence[int] = (12, 24, 36),
                 channels: int = 256, in_index: int = -1, norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        _check("ASPPHead", in_channels=in_channels, num_classes=num_classes, channels=channels)
        _check("ASPPHead atrous_rates", **{f"rate_{i}": r for i, r in enumerate(atrous_rates)})
        self.in_channels, self.num_classes, self.in_index = in_channels, num_classes, in_index
        self.atrous_rates = tuple(atrous_rates)
        self.branches = nn.ModuleList([ConvNormAct(in_channels, channels, 1, norm_layer=norm_layer)])
        for rate in atrous_rates:
            self.branches.append(ConvNormAct(in_channels, channels, 3, dilation=rate, norm_layer=norm_layer))
        self.branches.append(ASPPPooling(in_channels, channels, norm_layer))
        self.project = nn.Sequential(ConvNormAct(len(self.branches) * channels, channels, 1, norm_layer=norm_layer),
                                     nn.Dropout(0.5))
        self.fuse = ConvNormAct(channels, channels, 3, norm_layer=norm_layer)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        x = _level(feats, self.in_index, self.in_channels, "ASPPHead")
        x = self.project(torch.cat([b(x) for b in self.branches], dim=1))  # (B, channels, H_l, W_l)
        return self.classifier(self.fuse(x))


class FPNSegHead(nn.Module):
    """Panoptic FPN's semantic branch (Kirillov et al. 2019): each pyramid level goes through 3x3 conv,
    norm, ReLU blocks with 2x bilinear upsampling until it reaches the finest level's stride; the levels are
    summed and a 1x1 conv gives the classes. [(B, C, H_l, W_l)] -> (B, K, H_0, W_0)."""

    def __init__(self, feature_info: Sequence[FeatureInfo], num_classes: int, channels: int = 128,
                 norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        info = check_feature_info(feature_info, "FPNSegHead feature_info")
        _check("FPNSegHead", num_classes=num_classes, channels=channels)
        self.feature_info, self.num_classes = info, num_classes
        base = info[0].stride
        self.stages = nn.ModuleList()
        for f in info:
            steps = max(0, round(math.log2(f.stride / base)))  # 2x upsamplings to the finest level
            blocks = [ConvNormAct(f.channels, channels, 3, norm_layer=norm_layer)]
            blocks += [ConvNormAct(channels, channels, 3, norm_layer=norm_layer) for _ in range(max(0, steps - 1))]
            self.stages.append(nn.ModuleList(blocks))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        if len(feats) != len(self.stages):
            raise ValueError(f"FPNSegHead was built for {len(self.stages)} levels, got {len(feats)}")
        for i, f in enumerate(self.feature_info):
            _level(feats, i, f.channels, "FPNSegHead")
        target = feats[0].shape[-2:]
        out = None
        for f, blocks in zip(feats, self.stages):  # static level count
            x = f
            for i, block in enumerate(blocks):
                x = block(x)
                if x.shape[-2:] != target:  # each block doubles the size, the last one lands on the finest level
                    size = target if i == len(blocks) - 1 else (x.shape[-2] * 2, x.shape[-1] * 2)
                    x = _upsample(x, size)
            out = x if out is None else out + x
        return self.classifier(out)


class UNetDecoder(nn.Module):
    """U-Net decoder (Ronneberger et al. 2015) over every backbone level: from the deepest map up, upsample
    to the next level's size, concatenate its skip features, two 3x3 conv-norm-ReLU blocks; a 1x1 conv gives
    the classes at the finest level's stride. `channels[i]` is the decoder width at level i, for every level
    but the deepest (which only feeds the decoder): L - 1 widths.
    [(B, C_l, H_l, W_l)] -> (B, K, H_0, W_0)."""

    def __init__(self, feature_info: Sequence[FeatureInfo], num_classes: int, channels: Sequence[int] | None = None,
                 norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        info = check_feature_info(feature_info, "UNetDecoder feature_info")
        _check("UNetDecoder", num_classes=num_classes)
        if len(info) < 2:
            raise ValueError(f"UNetDecoder needs at least two levels, got {len(info)}")
        channels = tuple(channels) if channels is not None else tuple(max(16, f.channels // 2) for f in info[:-1])
        if len(channels) != len(info) - 1:
            raise ValueError(f"channels needs one width per level but the deepest ({len(info) - 1}), got {channels}")
        _check("UNetDecoder channels", **{f"level_{i}": c for i, c in enumerate(channels)})
        self.feature_info, self.num_classes = info, num_classes
        self.blocks = nn.ModuleList()
        below = info[-1].channels
        for i in range(len(info) - 2, -1, -1):  # deepest-but-one level up to the finest
            self.blocks.append(nn.Sequential(
                ConvNormAct(below + info[i].channels, channels[i], 3, norm_layer=norm_layer),
                ConvNormAct(channels[i], channels[i], 3, norm_layer=norm_layer)))
            below = channels[i]
        self.classifier = nn.Conv2d(below, num_classes, 1)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        if len(feats) != len(self.feature_info):
            raise ValueError(f"UNetDecoder was built for {len(self.feature_info)} levels, got {len(feats)}")
        for i, f in enumerate(self.feature_info):
            _level(feats, i, f.channels, "UNetDecoder")
        x = feats[-1]
        for block, skip in zip(self.blocks, reversed(feats[:-1])):
            x = block(torch.cat([_upsample(x, skip.shape[-2:]), skip], dim=1))
        return self.classifier(x)


class LRASPPHead(nn.Module):
    """Lite R-ASPP (Howard et al. 2019, torchvision's LRASPPHead): the high-level map through a 1x1 conv,
    gated by a global-pooled sigmoid attention, upsampled to the low-level map, where both are classified
    and summed. [(B, C, H, W)] (levels `low_index`, `high_index`) -> (B, K, H_low, W_low)."""

    def __init__(self, low_channels: int, high_channels: int, num_classes: int, inter_channels: int = 128,
                 low_index: int = 0, high_index: int = -1, norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        _check("LRASPPHead", low_channels=low_channels, high_channels=high_channels, num_classes=num_classes,
               inter_channels=inter_channels)
        self.low_channels, self.high_channels, self.num_classes = low_channels, high_channels, num_classes
        self.low_index, self.high_index = low_index, high_index
        self.cbr = ConvNormAct(high_channels, inter_channels, 1, norm_layer=norm_layer)
        self.scale = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(high_channels, inter_channels, 1, bias=False),
                                   nn.Sigmoid())
        self.low_classifier = nn.Conv2d(low_channels, num_classes, 1)
        self.high_classifier = nn.Conv2d(inter_channels, num_classes, 1)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        low = _level(feats, self.low_index, self.low_channels, "LRASPPHead")
        high = _level(feats, self.high_index, self.high_channels, "LRASPPHead")
        x = _upsample(self.cbr(high) * self.scale(high), low.shape[-2:])
        return self.low_classifier(low) + self.high_classifier(x)
