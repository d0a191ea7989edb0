"""ViTDet's simple feature pyramid: rescales one plain-ViT map (one stride) into several strides."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from cvzoo.layers import LayerNorm2d


def _rescale(channels: int, scale: float) -> tuple[nn.Module, int]:
    """One branch of the pyramid: (B, C, H, W) -> (B, C', H * scale, W * scale), and C'."""
    if scale == 4:  # two 2x2 transposed convs, halving channels each time (Li et al. 2022)
        return nn.Sequential(
            nn.ConvTranspose2d(channels, channels // 2, 2, 2), LayerNorm2d(channels // 2), nn.GELU(),
            nn.ConvTranspose2d(channels // 2, channels // 4, 2, 2),
        ), channels // 4
    if scale == 2:
        return nn.ConvTranspose2d(channels, channels // 2, 2, 2), channels // 2
    if scale == 1:
        return nn.Identity(), channels
    if scale == 0.5:
        return nn.MaxPool2d(2, 2), channels
    raise ValueError(f"simple pyramid scale {scale} not supported; strides must be 1/4, 1/2, 1 or 2 x the patch size")


class SimpleFeaturePyramid(nn.Module):
    """(B, C, H/p, W/p) -> [(B, C_i, H/s_i, W/s_i) for s_i in strides], each s_i in {p/4, p/2, p, 2p}."""

    def __init__(self, channels: int, patch_stride: int, strides: Sequence[int]) -> None:
        super().__init__()
        branches, self.channels = [], []
        for s in strides:
            branch, c = _rescale(channels, patch_stride / s)
            branches.append(branch)
            self.channels.append(c)
        self.branches = nn.ModuleList(branches)

    def forward(self, x: Tensor) -> list[Tensor]:
        return [branch(x) for branch in self.branches]
