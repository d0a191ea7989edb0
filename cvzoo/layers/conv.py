"""Convolution + normalisation + activation blocks."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

NormLayer = Callable[[int], nn.Module]
ActLayer = Callable[[], nn.Module]


class ConvNormAct(nn.Sequential):
    """Conv2d -> norm -> activation. (B, in_channels, H, W) -> (B, out_channels, H', W').

    `norm_layer`/`act_layer` are callables (`nn.BatchNorm2d`, `lambda c: nn.GroupNorm(32, c)`, `nn.SiLU`);
    pass None to leave either out. The conv has a bias only when there is no norm to absorb it.
    Padding defaults to "same" for odd kernels (`dilation * (kernel_size - 1) // 2`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        dilation: int = 1,
        groups: int = 1,
        norm_layer: NormLayer | None = nn.BatchNorm2d,
        act_layer: ActLayer | None = nn.ReLU,
        bias: bool | None = None,
    ) -> None:
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"ConvNormAct needs positive channels, got in_channels={in_channels}, "
                             f"out_channels={out_channels}")
        padding = dilation * (kernel_size - 1) // 2 if padding is None else padding
        bias = norm_layer is None if bias is None else bias
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=bias)
        ]
        if norm_layer is not None:
            layers.append(norm_layer(out_channels))
        if act_layer is not None:
            layers.append(act_layer())
        super().__init__(*layers)
        self.in_channels = in_channels
        self.out_channels = out_channels


class SeparableConvNormAct(nn.Sequential):
    """Depthwise k x k conv -> pointwise 1x1 conv -> norm -> activation (EfficientDet's BiFPN conv).

    (B, in_channels, H, W) -> (B, out_channels, H', W').
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        norm_layer: NormLayer | None = nn.BatchNorm2d,
        act_layer: ActLayer | None = None,
    ) -> None:
        super().__init__(
            nn.Conv2d(in_channels, in_channels, kernel_size, stride, (kernel_size - 1) // 2,
                      groups=in_channels, bias=False),
            ConvNormAct(in_channels, out_channels, 1, norm_layer=norm_layer, act_layer=act_layer),
        )
        self.in_channels = in_channels
        self.out_channels = out_channels

