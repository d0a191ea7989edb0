"""ResNet (He et al. 2016, the torchvision "v1.5" variant: stride on the 3x3 conv), dependency-free.

Parameter names follow torchvision's `ResNet`, so its ImageNet weights load as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cvzoo.backbones.base import Backbone, check_out_indices
from cvzoo.backbones.weights import PretrainedArg, load_pretrained
from cvzoo.layers import ActLayer, NormLayer
from cvzoo.types import FeatureInfo


class BasicBlock(nn.Module):
    """Two 3x3 convs with identity shortcut. (B, in_channels, H, W) -> (B, planes, H / stride, W / stride).

    `dilation` dilates both 3x3 convs (padding = dilation). torchvision's BasicBlock has no dilation;
    ResNet's `output_stride` gives it the same per-block dilation as a Bottleneck's 3x3 conv.
    """

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int, norm_layer: NormLayer, act_layer: ActLayer,
                 dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride, dilation, dilation, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, dilation, dilation, bias=False)
        self.bn2 = norm_layer(planes)
        self.act = act_layer()
        self.downsample = _shortcut(in_channels, planes, stride, norm_layer)

    def last_norm(self) -> nn.Module:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(out)) + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided or dilated), 1x1 expand x4. (B, in_channels, H, W) -> (B, 4 * planes, H / s, W / s).

    `dilation` dilates the 3x3 conv (padding = dilation), as torchvision's Bottleneck.
    """

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int, norm_layer: NormLayer, act_layer: ActLayer,
                 dilation: int = 1) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, dilation, dilation, bias=False)
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = norm_layer(out_channels)
        self.act = act_layer()
        self.downsample = _shortcut(in_channels, out_channels, stride, norm_layer)

    def last_norm(self) -> nn.Module:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        return self.act(self.bn3(self.conv3(out)) + shortcut)


def _shortcut(in_channels: int, out_channels: int, stride: int, norm_layer: NormLayer) -> nn.Module | None:
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), norm_layer(out_channels))


_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(Backbone):
    """ResNet feature extractor. (B, in_channels, H, W) -> [(B, C_i, H / s_i, W / s_i) for i in out_indices].

    Stages are 0-based: stage i (torchvision's `layer{i+1}`) has stride 4 * 2**i, so the default
    `out_indices=(1, 2, 3)` returns C3, C4, C5 at strides 8, 16, 32. Stages after the last requested
    one are not built.

    `output_stride` (8, 16 or 32) caps the downsampling for dense prediction (DeepLab): once the
    cumulative stride reaches it, later stages keep stride 1 and double the dilation instead, as
    torchvision's `replace_stride_with_dilation` ([False, True, True] is output_stride=8, [False,
    False, True] 16). The first block of a dilated stage uses the previous dilation, the following
    blocks the new one. Stage i then has stride min(4 * 2**i, output_stride); parameter names and
    shapes do not change, so torchvision's weights load as they are.
    """

    def __init__(
        self,
        layers: Sequence[int] = (2, 2, 2, 2),
        block: str = "basic",
        widths: Sequence[int] = (64, 128, 256, 512),
        stem_width: int = 64,
        in_channels: int = 3,
        out_indices: Sequence[int] = (1, 2, 3),
        norm_layer: NormLayer = nn.BatchNorm2d,
        act_layer: ActLayer = nn.ReLU,
        zero_init_residual: bool = False,
        frozen_stages: int = -1,
        grad_checkpointing: bool = False,
        output_stride: int = 32,
    ) -> None:
        super().__init__()
        if block not in _BLOCKS:
            raise ValueError(f"block must be one of {sorted(_BLOCKS)}, got {block!r}")
        if len(layers) != len(widths) or any(n < 1 for n in layers):
            raise ValueError(f"layers {tuple(layers)!r} and widths {tuple(widths)!r} must have equal length "
                             "and at least one block per stage")
        if in_channels < 1:
            raise ValueError(f"in_channels must be positive, got {in_channels}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride!r}")
        self.out_indices = check_out_indices(out_indices, len(layers), "ResNet")
        self.output_stride = output_stride
        block_cls = _BLOCKS[block]

        self.conv1 = nn.Conv2d(in_channels, stem_width, 7, 2, 3, bias=False)
        self.bn1 = norm_layer(stem_width)
        self.act = act_layer()
        self.maxpool = nn.MaxPool2d(3, 2, 1)

        channels, info = stem_width, []
        total_stride, dilation = 4, 1  # after the stem
        for i in range(self.out_indices[-1] + 1):
            stride, previous_dilation = (1 if i == 0 else 2), dilation
            if stride > 1 and total_stride >= output_stride:  # torchvision's replace_stride_with_dilation
                stride, dilation = 1, dilation * 2
            total_stride *= stride
            blocks = []
            for j in range(layers[i]):
                blocks.append(block_cls(channels, widths[i], stride if j == 0 else 1, norm_layer, act_layer,
                                        dilation=previous_dilation if j == 0 else dilation))
                channels = widths[i] * block_cls.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            info.append(FeatureInfo(channels, total_stride))
        self.num_stages = len(info)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:  # each residual branch starts as identity (Goyal et al. 2017)
            for m in self.modules():
                if isinstance(m, BasicBlock | Bottleneck) and getattr(m.last_norm(), "weight", None) is not None:
                    nn.init.zeros_(m.last_norm().weight)

        self._declare([info[i] for i in self.out_indices], in_channels)
        self.grad_checkpointing = grad_checkpointing
        self.freeze_stages(frozen_stages)

    def stages(self) -> list[nn.Module]:
        return [getattr(self, f"layer{i + 1}") for i in range(self.num_stages)]

    def frozen_stage_modules(self) -> list[nn.Module]:
        return [nn.ModuleList([self.conv1, self.bn1]), *self.stages()]

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.act(self.bn1(self.conv1(x))))  # (B, stem_width, H/4, W/4)
        feats = []
        for i, stage in enumerate(self.stages()):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
            if i in self.out_indices:
                feats.append(x)
        return feats


def _torchvision_url(name: str) -> str:
    from torchvision.models import get_model_weights

    return get_model_weights(name).IMAGENET1K_V1.url


def _build(layers, block, widths, stem_width, tv_name: str | None, pretrained: PretrainedArg, **kwargs) -> ResNet:
    model = ResNet(layers=layers, block=block, widths=widths, stem_width=stem_width, **kwargs)
    url = _torchvision_url(tv_name) if pretrained is True and tv_name else None
    return load_pretrained(model, pretrained, url) if pretrained else model


def resnet_micro(pretrained: PretrainedArg = False, **kwargs) -> ResNet:
    """A 0.3M-parameter ResNet (one basic block a stage, widths 16-128) for CPU tests and demos."""
    return _build((1, 1, 1, 1), "basic", (16, 32, 64, 128), 16, None, pretrained, **kwargs)


def resnet18(pretrained: PretrainedArg = False, **kwargs) -> ResNet:
    """ResNet-18; `pretrained=True` loads torchvision's ImageNet weights, a path loads a local file."""
    return _build((2, 2, 2, 2), "basic", (64, 128, 256, 512), 64, "resnet18", pretrained, **kwargs)


def resnet34(pretrained: PretrainedArg = False, **kwargs) -> ResNet:
    """ResNet-34; `pretrained=True` loads torchvision's ImageNet weights, a path loads a local file."""
    return _build((3, 4, 6, 3), "basic", (64, 128, 256, 512), 64, "resnet34", pretrained, **kwargs)


def resnet50(pretrained: PretrainedArg = False, **kwargs) -> ResNet:
    """ResNet-50; `pretrained=True` loads torchvision's ImageNet weights, a path loads a local file."""
    return _build((3, 4, 6, 3), "bottleneck", (64, 128, 256, 512), 64, "resnet50", pretrained, **kwargs)
