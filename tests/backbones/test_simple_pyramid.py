"""cvzoo/backbones/simple_pyramid.py: ViTDet's simple feature pyramid from one patch-stride map."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cvzoo.backbones import SimpleFeaturePyramid


@pytest.mark.parametrize(
    ("strides", "channels"),
    [((4, 8, 16, 32), [48, 96, 192, 192]), ((8, 16, 32), [96, 192, 192]), ((16,), [192]), ((4, 32), [48, 192])],
)
def test_shapes_from_patch_16_map(strides, channels):
    pyramid = SimpleFeaturePyramid(192, 16, strides)
    assert pyramid.channels == channels
    x = torch.randn(2, 192, 96 // 16, 128 // 16)  # a 96x128 image at patch stride 16
    feats = pyramid(x)
    assert [tuple(f.shape) for f in feats] == [(2, c, 96 // s, 128 // s) for c, s in zip(channels, strides)]


def test_patch_stride_and_downsampled_levels_are_closed_form():
    pyramid = SimpleFeaturePyramid(32, 16, (16, 32))
    x = torch.randn(2, 32, 6, 8)
    same, down = pyramid(x)
    torch.testing.assert_close(same, x, rtol=0, atol=0)
    torch.testing.assert_close(down, F.max_pool2d(x, 2, 2), rtol=0, atol=0)


def test_upsampling_branch_is_transposed_conv():
    pyramid = SimpleFeaturePyramid(32, 16, (8,))
    conv = pyramid.branches[0]
    x = torch.randn(2, 32, 3, 4)
    (up,) = pyramid(x)
    torch.testing.assert_close(up, F.conv_transpose2d(x, conv.weight, conv.bias, stride=2), rtol=1e-6, atol=1e-6)


def test_patch_8_map():
    pyramid = SimpleFeaturePyramid(64, 8, (2, 4, 8, 16))
    feats = pyramid(torch.randn(2, 64, 8, 8))
    assert [tuple(f.shape) for f in feats] == [(2, 16, 32, 32), (2, 32, 16, 16), (2, 64, 8, 8), (2, 64, 4, 4)]


def test_backward_reaches_every_parameter():
    pyramid = SimpleFeaturePyramid(32, 16, (4, 8, 16, 32))
    sum(f.square().mean() for f in pyramid(torch.randn(2, 32, 4, 4))).backward()
    assert all(p.grad is not None for p in pyramid.parameters())


@pytest.mark.parametrize("strides", [(2, 8, 16), (8, 16, 64), (12,), (24,)])
def test_unsupported_stride_raises(strides):
    with pytest.raises(ValueError, match="scale"):
        SimpleFeaturePyramid(192, 16, strides)
