"""cvzoo.necks.bifpn: fast normalised fusion and one BiFPN pass against their closed forms (EfficientDet eq. 2/3)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cvzoo.necks import BiFPN, BiFPNLayer, WeightedFusion
from cvzoo.types import FeatureInfo

INFO = (FeatureInfo(6, 8), FeatureInfo(10, 16), FeatureInfo(12, 32))


def _closed_form(weights: torch.Tensor, inputs: list[torch.Tensor], eps: float) -> torch.Tensor:
    w = weights.clamp(min=0)
    return sum(wi * x for wi, x in zip(w, inputs)) / (w.sum() + eps)


def _strip(fusion: WeightedFusion) -> WeightedFusion:
    fusion.act = nn.Identity()
    fusion.conv = nn.Identity()
    return fusion


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.7, -0.3, 1.5], [2.0, 0.5, 0.0]])
def test_weighted_fusion_matches_closed_form_before_act_and_conv(weights):
    torch.manual_seed(0)
    fusion = _strip(WeightedFusion(3, 4, nn.BatchNorm2d, nn.SiLU, eps=1e-4))
    with torch.no_grad():
        fusion.weight.copy_(torch.tensor(weights))
    inputs = [torch.randn(2, 4, 5, 7) for _ in range(3)]
    torch.testing.assert_close(fusion(inputs), _closed_form(torch.tensor(weights), inputs, 1e-4))


def test_weighted_fusion_equal_weights_is_nearly_the_mean():
    fusion = _strip(WeightedFusion(2, 3, None, nn.SiLU))
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(fusion([a, b]), (a + b) / (2 + 1e-4))


def test_weighted_fusion_all_negative_weights_gives_zeros_not_nan():
    fusion = _strip(WeightedFusion(2, 3, None, nn.SiLU))
    with torch.no_grad():
        fusion.weight.fill_(-1.0)
    out = fusion([torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)])
    assert torch.isfinite(out).all()
    assert torch.count_nonzero(out) == 0


def test_weighted_fusion_applies_act_then_separable_conv():
    torch.manual_seed(0)
    fusion = WeightedFusion(2, 4, None, nn.SiLU).eval()
    with torch.no_grad():
        fusion.weight.copy_(torch.tensor([0.3, 1.2]))
    a, b = torch.randn(2, 4, 5, 6), torch.randn(2, 4, 5, 6)
    fused = F.silu(_closed_form(torch.tensor([0.3, 1.2]), [a, b], 1e-4))
    depthwise, pointwise = fusion.conv[0], fusion.conv[1][0]
    ref = F.conv2d(fused, depthwise.weight, None, padding=1, groups=4)
    ref = F.conv2d(ref, pointwise.weight, pointwise.bias)
    torch.testing.assert_close(fusion([a, b]), ref, rtol=1e-5, atol=1e-5)


def test_weighted_fusion_weight_gets_gradient():
    fusion = WeightedFusion(2, 3, None, nn.SiLU)
    out = fusion([torch.randn(2, 3, 4, 4), 3 * torch.randn(2, 3, 4, 4)])
    (out * torch.randn_like(out)).sum().backward()
    assert fusion.weight.grad is not None and fusion.weight.grad.abs().sum() > 0


def _down(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    y = F.max_pool2d(x, 3, 2, 1)
    return y if y.shape[-2:] == like.shape[-2:] else F.interpolate(y, size=like.shape[-2:], mode="nearest")


def test_bifpn_layer_topology_matches_closed_form():
    # EfficientDet: td_i = fuse(P_i, up(td_{i+1})); out_i = fuse(P_i, td_i, down(out_{i-1})), top: fuse(P_top, down)
    torch.manual_seed(0)
    layer = BiFPNLayer(3, 4, None, nn.SiLU)
    for f in [*layer.top_down, *layer.bottom_up]:
        _strip(f)
        with torch.no_grad():
            f.weight.uniform_(0.2, 2.0)
    p = [torch.randn(2, 4, 13, 17), torch.randn(2, 4, 7, 9), torch.randn(2, 4, 4, 5)]

    def up(x, like):
        return F.interpolate(x, size=like.shape[-2:], mode="nearest")

    td2 = p[2]
    td1 = _closed_form(layer.top_down[1].weight, [p[1], up(td2, p[1])], 1e-4)
    td0 = _closed_form(layer.top_down[0].weight, [p[0], up(td1, p[0])], 1e-4)
    out0 = td0
    out1 = _closed_form(layer.bottom_up[0].weight, [p[1], td1, _down(out0, p[1])], 1e-4)
    out2 = _closed_form(layer.bottom_up[1].weight, [p[2], _down(out1, p[2])], 1e-4)
    got = layer(p)
    assert len(got) == 3
    for a, b in zip(got, (out0, out1, out2)):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-5)


def test_bifpn_extra_levels_are_max_pooled_from_projected_last_input():
    torch.manual_seed(0)
    neck = BiFPN(INFO, 8, num_repeats=1, extra_levels=2).eval()
    neck.layers = nn.Sequential()  # look at the pyramid the BiFPN layers receive
    feats = [torch.randn(2, f.channels, h, w) for f, (h, w) in zip(INFO, ((13, 17), (7, 9), (4, 5)))]
    out = neck(feats)
    proj = neck.input_proj[-1]
    bn = proj[1]
    c5 = F.conv2d(feats[-1], proj[0].weight)
    c5 = F.batch_norm(c5, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    p6 = F.max_pool2d(c5, 3, 2, 1)
    p7 = F.max_pool2d(p6, 3, 2, 1)
    assert len(out) == 5
    torch.testing.assert_close(out[2], c5)
    torch.testing.assert_close(out[3], p6)
    torch.testing.assert_close(out[4], p7)
    assert [tuple(o.shape[-2:]) for o in out[3:]] == [(2, 3), (1, 2)]


def test_bifpn_repeats_and_fusion_arity():
    neck = BiFPN(INFO, 8, num_repeats=3, extra_levels=2)
    assert len(neck.layers) == 3
    layer = neck.layers[0]
    assert [f.weight.numel() for f in layer.top_down] == [2, 2, 2, 2]
    assert [f.weight.numel() for f in layer.bottom_up] == [3, 3, 3, 2]


@pytest.mark.parametrize(
    "kwargs, arg, value",
    [
        (dict(feature_info=[]), "feature_info", "[]"),
        (dict(feature_info=[FeatureInfo(4, 16), FeatureInfo(8, 8)]), "feature_info", "[16, 8]"),
        (dict(feature_info=[FeatureInfo(4, 8), FeatureInfo(8, 8)]), "BiFPN feature_info", "[8, 8]"),
        (dict(out_channels=0), "out_channels", "0"),
        (dict(num_repeats=0), "num_repeats", "0"),
        (dict(extra_levels=-1), "extra_levels", "-1"),
        (dict(feature_info=[FeatureInfo(4, 8)], extra_levels=0), "extra_levels", "0"),
    ],
    ids=["empty", "decreasing", "equal-strides", "out0", "repeats0", "extra-neg", "one-level"],
)
def test_bifpn_rejects_bad_constructor_args(kwargs, arg, value):
    kwargs = {"feature_info": INFO, "out_channels": 8, **kwargs}
    with pytest.raises(ValueError, match=arg) as err:
        BiFPN(**kwargs)
    assert value in str(err.value)
