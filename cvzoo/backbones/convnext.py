"""ConvNeXt (Liu et al. 2022), dependency-free.

Parameter names follow timm's `ConvNeXt`, so timm checkpoints load as they are (checkpoints of the
`conv_mlp=True` variants such as convnext_atto have their 1x1-conv MLP weights reshaped to Linear).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import StochasticDepth

from cvzoo.backbones.base import Backbone, check_out_indices
from cvzoo.backbones.weights import PretrainedArg, load_pretrained
from cvzoo.layers import ActLayer, LayerNorm2d
from cvzoo.types import FeatureInfo


class ConvNeXtMlp(nn.Module):
    """Pointwise MLP on channels-last maps. (B, H, W, C) -> (B, H, W, C)."""

    def __init__(self, channels: int, hidden: int, act_layer: ActLayer) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise conv, LayerNorm, MLP x4, layer scale, residual. (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int, mlp_ratio: float, layer_scale_init: float | None, drop_path: float,
                 act_layer: ActLayer) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = ConvNeXtMlp(channels, int(mlp_ratio * channels), act_layer)
        self.gamma = nn.Parameter(torch.full((channels,), layer_scale_init)) if layer_scale_init else None
        self.drop_path = StochasticDepth(drop_path, "row") if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv_dw(x).permute(0, 2, 3, 1)  # (B, H, W, C): LayerNorm and Linear act on the last dim
        y = self.mlp(self.norm(y))
        if self.gamma is not None:
            y = y * self.gamma
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class ConvNeXtStage(nn.Module):
    """Optional 2x2 patch-merging downsample, then `depth` blocks. (B, C_in, H, W) -> (B, C_out, H/s, W/s)."""

    def __init__(self, in_channels: int, out_channels: int, depth: int, downsample: bool, drop_paths: list[float],
                 mlp_ratio: float, layer_scale_init: float | None, act_layer: ActLayer) -> None:
        super().__init__()
        self.downsample = (
            nn.Sequential(LayerNorm2d(in_channels, eps=1e-6), nn.Conv2d(in_channels, out_channels, 2, 2))
            if downsample else nn.Identity()
        )
        self.blocks = nn.Sequential(
            *(ConvNeXtBlock(out_channels, mlp_ratio, layer_scale_init, dp, act_layer) for dp in drop_paths[:depth])
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))


class ConvNeXt(Backbone):
    """ConvNeXt feature extractor. (B, in_channels, H, W) -> [(B, dims[i], H / s_i, W / s_i) for i in out_indices].

    Stage i has stride 4 * 2**i (timm's feature indices for ConvNeXt are the same); the default
    `out_indices=(1, 2, 3)` returns strides 8, 16, 32. Stages after the last requested one are not built.
    """

    def __init__(
        self,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        in_channels: int = 3,
        out_indices: Sequence[int] = (1, 2, 3),
        mlp_ratio: float = 4.0,
        layer_scale_init: float | None = 1e-6,
        drop_path_rate: float = 0.0,
        act_layer: ActLayer = nn.GELU,
        frozen_stages: int = -1,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if len(depths) != len(dims) or any(d < 1 for d in depths):
            raise ValueError(f"depths {tuple(depths)!r} and dims {tuple(dims)!r} must have equal length "
                             "and at least one block per stage")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must lie in [0, 1), got {drop_path_rate}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be positive, got {in_channels}")
        self.out_indices = check_out_indices(out_indices, len(depths), "ConvNeXt")
        num_stages = self.out_indices[-1] + 1
        self.stem = nn.Sequential(nn.Conv2d(in_channels, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()  # linearly rising over all blocks
        stages, start = [], 0
        for i in range(num_stages):
            stages.append(ConvNeXtStage(dims[i - 1] if i else dims[0], dims[i], depths[i], i > 0,
                                        rates[start:start + depths[i]], mlp_ratio, layer_scale_init, act_layer))
            start += depths[i]
        self.stages = nn.Sequential(*stages)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self._declare([FeatureInfo(dims[i], 4 * 2**i) for i in self.out_indices], in_channels)
        self.grad_checkpointing = grad_checkpointing
        self.freeze_stages(frozen_stages)

    def frozen_stage_modules(self) -> list[nn.Module]:
        return [self.stem, *self.stages]

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)  # (B, dims[0], H/4, W/4)
        feats = []
        for i, stage in enumerate(self.stages):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
            if i in self.out_indices:
                feats.append(x)
        return feats


def convert_timm_convnext(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """timm ConvNeXt state dict -> cvzoo ConvNeXt: 1x1-conv MLP weights (conv_mlp=True) become Linear."""
    out = {}
    for k, v in state.items():
        if ".mlp.fc" in k and k.endswith(".weight") and v.ndim == 4:
            v = v.flatten(1)  # (out, in, 1, 1) -> (out, in)
        out[k] = v
    return out


def _build(depths, dims, timm_name: str | None, pretrained: PretrainedArg, **kwargs) -> ConvNeXt:
    model = ConvNeXt(depths=depths, dims=dims, **kwargs)
    if not pretrained:
        return model
    url = None
    if pretrained is True and timm_name:  # timm publishes its weights on the Hugging Face hub
        url = f"https://huggingface.co/timm/{timm_name}/resolve/main/pytorch_model.bin"
    return load_pretrained(model, pretrained, url, convert_timm_convnext)


def convnext_micro(pretrained: PretrainedArg = False, **kwargs) -> ConvNeXt:
    """A 0.2M-parameter ConvNeXt (one block a stage, dims 16-128) for CPU tests and demos."""
    return _build((1, 1, 1, 1), (16, 32, 64, 128), None, pretrained, **kwargs)


def convnext_atto(pretrained: PretrainedArg = False, **kwargs) -> ConvNeXt:
    """ConvNeXt-Atto (3.4M backbone parameters); `pretrained=True` loads timm's ImageNet weights."""
    return _build((2, 2, 6, 2), (40, 80, 160, 320), "convnext_atto.d2_in1k", pretrained, **kwargs)


def convnext_tiny(pretrained: PretrainedArg = False, **kwargs) -> ConvNeXt:
    """ConvNeXt-Tiny (28M parameters); `pretrained=True` loads timm's ImageNet weights."""
    return _build((3, 3, 9, 3), (96, 192, 384, 768), "convnext_tiny.fb_in1k", pretrained, **kwargs)
