"""cvzoo.layers.conv: ConvNormAct and SeparableConvNormAct against torch.nn.functional."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cvzoo.layers import ConvNormAct, SeparableConvNormAct


def test_conv_bias_only_without_norm():
    assert ConvNormAct(3, 4)[0].bias is None
    assert ConvNormAct(3, 4, norm_layer=None)[0].bias is not None
    assert ConvNormAct(3, 4, bias=True)[0].bias is not None
    assert ConvNormAct(3, 4, norm_layer=None, bias=False)[0].bias is None


@pytest.mark.parametrize("kernel_size, dilation", [(1, 1), (3, 1), (5, 1), (7, 1), (3, 2), (5, 3)])
def test_default_padding_keeps_odd_sizes(kernel_size, dilation):
    block = ConvNormAct(3, 4, kernel_size, dilation=dilation, norm_layer=None)
    assert block(torch.randn(2, 3, 13, 17)).shape == (2, 4, 13, 17)


@pytest.mark.parametrize("size", [(13, 17), (12, 16), (1, 1)])
def test_stride_two_halves_rounding_up(size):
    block = ConvNormAct(3, 4, 3, stride=2, norm_layer=None)
    h, w = size
    assert block(torch.randn(2, 3, h, w)).shape == (2, 4, math.ceil(h / 2), math.ceil(w / 2))


def test_layers_present_and_absent():
    full = ConvNormAct(3, 4, norm_layer=nn.BatchNorm2d, act_layer=nn.SiLU)
    assert [type(m) for m in full] == [nn.Conv2d, nn.BatchNorm2d, nn.SiLU]
    assert [type(m) for m in ConvNormAct(3, 4, norm_layer=None)] == [nn.Conv2d, nn.ReLU]
    assert [type(m) for m in ConvNormAct(3, 4, act_layer=None)] == [nn.Conv2d, nn.BatchNorm2d]
    assert [type(m) for m in ConvNormAct(3, 4, norm_layer=None, act_layer=None)] == [nn.Conv2d]
    gn = ConvNormAct(3, 8, norm_layer=lambda c: nn.GroupNorm(2, c))
    assert isinstance(gn[1], nn.GroupNorm) and gn[1].num_channels == 8
    assert (full.in_channels, full.out_channels) == (3, 4)


def test_conv_norm_act_equals_functional_reference():
    torch.manual_seed(0)
    block = ConvNormAct(3, 4, 3, stride=2, dilation=2, groups=1).eval()
    bn = block[1]
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    x = torch.randn(2, 3, 11, 13)
    y = F.conv2d(x, block[0].weight, None, stride=2, padding=2, dilation=2)
    y = (y - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps)
    y = F.relu(y * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1))
    torch.testing.assert_close(block(x), y, rtol=1e-5, atol=1e-5)


def test_explicit_padding_and_groups():
    block = ConvNormAct(4, 8, 3, padding=0, groups=2, norm_layer=None, act_layer=None)
    assert block[0].groups == 2
    assert block(torch.randn(2, 4, 9, 10)).shape == (2, 8, 7, 8)


@pytest.mark.parametrize("in_channels, out_channels", [(0, 4), (3, 0), (-1, 4)])
def test_conv_norm_act_rejects_non_positive_channels(in_channels, out_channels):
    with pytest.raises(ValueError, match="in_channels" if in_channels < 1 else "out_channels"):
        ConvNormAct(in_channels, out_channels)


@pytest.mark.parametrize("stride, size, expected", [(1, (13, 17), (13, 17)), (2, (13, 17), (7, 9)),
                                                    (2, (12, 16), (6, 8))])
def test_separable_conv_shapes(stride, size, expected):
    block = SeparableConvNormAct(6, 10, 3, stride=stride)
    assert block(torch.randn(2, 6, *size)).shape == (2, 10, *expected)
    assert (block.in_channels, block.out_channels) == (6, 10)


def test_separable_conv_equals_depthwise_then_pointwise():
    torch.manual_seed(0)
    block = SeparableConvNormAct(4, 6, 5, norm_layer=None, act_layer=nn.ReLU)
    depthwise, pointwise = block[0], block[1][0]
    assert depthwise.groups == 4 and depthwise.weight.shape == (4, 1, 5, 5) and depthwise.bias is None
    assert pointwise.weight.shape == (6, 4, 1, 1) and pointwise.bias is not None
    x = torch.randn(2, 4, 9, 7)
    ref = F.relu(F.conv2d(F.conv2d(x, depthwise.weight, None, padding=2, groups=4), pointwise.weight, pointwise.bias))
    torch.testing.assert_close(block(x), ref, rtol=1e-5, atol=1e-5)


def test_separable_conv_default_has_norm_and_no_act():
    block = SeparableConvNormAct(4, 6)
    assert [type(m) for m in block[1]] == [nn.Conv2d, nn.BatchNorm2d]
    assert block[1][0].bias is None
