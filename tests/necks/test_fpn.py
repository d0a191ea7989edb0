"""cvzoo.necks.fpn against torchvision's FeaturePyramidNetwork (same weights, odd sizes) and its own contract."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from cvzoo.necks import FPN, ExtraLevels
from cvzoo.types import FeatureInfo

IN_CHANNELS = (6, 10, 12)
STRIDES = (8, 16, 32)
# maps of a 97x131 image at strides 8/16/32 (ceil division, as a stride-2 conv with padding produces)
SIZES = ((13, 17), (7, 9), (4, 5))
OUT = 8


def _info(channels=IN_CHANNELS) -> list[FeatureInfo]:
    return [FeatureInfo(c, s) for c, s in zip(channels, STRIDES)]


def _feats(channels=IN_CHANNELS, sizes=SIZES, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, c, h, w, generator=g) for c, (h, w) in zip(channels, sizes)]


def _copy_fpn_weights(ours: FPN, tv: FeaturePyramidNetwork) -> None:
    with torch.no_grad():
        for i in range(len(tv.inner_blocks)):
            ours.lateral[i][0].weight.copy_(tv.inner_blocks[i][0].weight)
            ours.lateral[i][0].bias.copy_(tv.inner_blocks[i][0].bias)
            ours.smooth[i][0].weight.copy_(tv.layer_blocks[i][0].weight)
            ours.smooth[i][0].bias.copy_(tv.layer_blocks[i][0].bias)
        extra = tv.extra_blocks
        if isinstance(extra, LastLevelP6P7):
            for conv, ref in zip(ours.extra.convs, (extra.p6, extra.p7)):
                conv.weight.copy_(ref.weight)
                conv.bias.copy_(ref.bias)


def _randomise_biases(tv: FeaturePyramidNetwork) -> None:
    # torchvision initialises biases to zero, which would hide a bias that is dropped or misplaced
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, torch.nn.Conv2d) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


def _run_tv(tv: FeaturePyramidNetwork, feats: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(tv(OrderedDict((f"c{i}", f) for i, f in enumerate(feats))).values())


def _assert_same(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sizes", [SIZES, ((12, 16), (6, 8), (3, 4))], ids=["ceil", "floor"])
def test_fpn_matches_torchvision_without_extra_levels(sizes):
    torch.manual_seed(0)
    tv = FeaturePyramidNetwork(list(IN_CHANNELS), OUT)
    _randomise_biases(tv)
    ours = FPN(_info(), OUT)
    _copy_fpn_weights(ours, tv)
    feats = _feats(sizes=sizes)
    _assert_same(ours(feats), _run_tv(tv, feats))


def test_fpn_extra_levels_from_output_match_torchvision_p6p7():
    torch.manual_seed(0)
    tv = FeaturePyramidNetwork(list(IN_CHANNELS), OUT, extra_blocks=LastLevelP6P7(OUT, OUT))
    _randomise_biases(tv)
    ours = FPN(_info(), OUT, extra_levels=2, extra_source="output")
    _copy_fpn_weights(ours, tv)
    feats = _feats()
    out = ours(feats)
    _assert_same(out, _run_tv(tv, feats))
    assert [tuple(o.shape[-2:]) for o in out[3:]] == [(2, 3), (1, 2)]


def test_fpn_extra_levels_from_input_match_torchvision_p6p7():
    torch.manual_seed(0)
    assert IN_CHANNELS[-1] != OUT  # torchvision reads C5 only when the channel counts differ
    tv = FeaturePyramidNetwork(list(IN_CHANNELS), OUT, extra_blocks=LastLevelP6P7(IN_CHANNELS[-1], OUT))
    _randomise_biases(tv)
    ours = FPN(_info(), OUT, extra_levels=2, extra_source="input")
    _copy_fpn_weights(ours, tv)
    feats = _feats()
    _assert_same(ours(feats), _run_tv(tv, feats))


def test_fpn_extra_source_input_reads_c5_even_when_channels_equal_out():
    # torchvision silently switches to P5 when C5 has out_channels channels; cvzoo's "input" means C5 always
    torch.manual_seed(0)
    channels = (6, 10, OUT)
    ours = FPN(_info(channels), OUT, extra_levels=2, extra_source="input")
    feats = _feats(channels)
    out = ours(feats)
    p6_ref = F.conv2d(feats[-1], ours.extra.convs[0].weight, ours.extra.convs[0].bias, stride=2, padding=1)
    p7_ref = F.conv2d(F.relu(p6_ref), ours.extra.convs[1].weight, ours.extra.convs[1].bias, stride=2, padding=1)
    torch.testing.assert_close(out[3], p6_ref)
    torch.testing.assert_close(out[4], p7_ref)


def test_fpn_maxpool_extra_level_matches_torchvision_last_level_max_pool():
    torch.manual_seed(0)
    tv = FeaturePyramidNetwork(list(IN_CHANNELS), OUT, extra_blocks=LastLevelMaxPool())
    _randomise_biases(tv)
    ours = FPN(_info(), OUT, extra_levels=1, extra_mode="maxpool")
    _copy_fpn_weights(ours, tv)
    assert sum(p.numel() for p in ours.extra.parameters()) == 0
    feats = _feats()
    _assert_same(ours(feats), _run_tv(tv, feats))


def test_fpn_feature_info_declares_extra_strides():
    fpn = FPN(_info(), OUT, extra_levels=2)
    assert fpn.feature_info == (
        FeatureInfo(OUT, 8), FeatureInfo(OUT, 16), FeatureInfo(OUT, 32), FeatureInfo(OUT, 64), FeatureInfo(OUT, 128)
    )
    assert fpn.num_levels == 5
    assert FPN(_info(), OUT).num_levels == 3


def test_fpn_init_matches_torchvision_convention():
    # kaiming_uniform_(a=1): |w| <= sqrt(3 / fan_in), zero bias
    torch.manual_seed(0)
    fpn = FPN(_info(), OUT, extra_levels=2)
    for m in fpn.modules():
        if isinstance(m, torch.nn.Conv2d):
            fan_in = m.weight[0].numel()
            assert m.weight.abs().max() <= (3.0 / fan_in) ** 0.5 + 1e-6
            assert torch.count_nonzero(m.bias) == 0


def test_fpn_with_norm_and_act_uses_them():
    fpn = FPN(_info(), OUT, norm_layer=torch.nn.BatchNorm2d, act_layer=torch.nn.ReLU).eval()
    assert isinstance(fpn.lateral[0][1], torch.nn.BatchNorm2d)
    assert fpn.lateral[0][0].bias is None  # the norm absorbs the bias
    out = fpn(_feats())
    assert all(bool((o >= 0).all()) for o in out)  # ReLU last


def test_extra_levels_conv_closed_form():
    torch.manual_seed(0)
    extra = ExtraLevels(5, OUT, 3)
    x = torch.randn(2, 5, 9, 11)
    out = extra(x)
    ref = F.conv2d(x, extra.convs[0].weight, extra.convs[0].bias, 2, 1)
    expected = [ref]
    for conv in extra.convs[1:]:
        ref = F.conv2d(F.relu(ref), conv.weight, conv.bias, 2, 1)
        expected.append(ref)
    assert [tuple(o.shape) for o in out] == [(2, OUT, 5, 6), (2, OUT, 3, 3), (2, OUT, 2, 2)]
    for a, b in zip(out, expected):
        torch.testing.assert_close(a, b)


def test_extra_levels_maxpool_closed_form():
    x = torch.randn(2, 4, 9, 11)
    out = ExtraLevels(4, 4, 2, mode="maxpool")(x)
    torch.testing.assert_close(out[0], x[:, :, ::2, ::2])
    torch.testing.assert_close(out[1], x[:, :, ::4, ::4])


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        (dict(feature_info=[]), "feature_info"),
        (dict(feature_info=[FeatureInfo(4, 16), FeatureInfo(8, 8)]), "feature_info"),
        (dict(feature_info=[FeatureInfo(0, 8)]), "feature_info"),
        (dict(out_channels=0), "out_channels"),
        (dict(extra_levels=-1), "extra_levels"),
        (dict(extra_source="c5"), "extra_source"),
        (dict(extra_levels=1, extra_mode="avgpool"), "extra_mode"),
        (dict(extra_levels=0, extra_mode="avgpool"), "extra_mode"),
        (dict(extra_levels=1, extra_mode="maxpool", extra_source="input"), "extra_mode"),
    ],
    ids=["empty", "decreasing", "zero-channels", "out0", "extra-neg", "source",
         "mode", "mode-unused", "maxpool-channels"],
)
def test_fpn_rejects_bad_constructor_args(kwargs, arg):
    kwargs = {"feature_info": _info(), "out_channels": OUT, **kwargs}
    with pytest.raises(ValueError, match=arg):
        FPN(**kwargs)


def test_fpn_accepts_equal_strides_of_a_dilated_backbone():
    # layer3 and layer4 of an output-stride-8 ResNet: the top-down sum needs no upsampling between them
    torch.manual_seed(0)
    info = [FeatureInfo(4, 4), FeatureInfo(6, 8), FeatureInfo(10, 8)]
    fpn = FPN(info, OUT, norm_layer=None, act_layer=None, extra_levels=1)
    assert fpn.feature_info == (FeatureInfo(OUT, 4), FeatureInfo(OUT, 8), FeatureInfo(OUT, 8), FeatureInfo(OUT, 16))
    feats = _feats((4, 6, 10), ((25, 33), (13, 17), (13, 17)))
    out = fpn(feats)
    lat = [conv(f) for conv, f in zip(fpn.lateral, feats)]
    p1 = lat[1] + lat[2]  # same size: nearest interpolation is the identity
    torch.testing.assert_close(out[2], fpn.smooth[2](lat[2]))
    torch.testing.assert_close(out[1], fpn.smooth[1](p1))
    torch.testing.assert_close(out[0], fpn.smooth[0](lat[0] + F.interpolate(p1, size=(25, 33), mode="nearest")))
    assert out[3].shape == (2, OUT, 7, 9)


def test_extra_levels_rejects_unknown_mode():
    with pytest.raises(ValueError, match="extra_mode"):
        ExtraLevels(4, 4, 1, mode="bilinear")


def test_extra_levels_rejects_negative_num_levels():
    with pytest.raises(ValueError, match="levels"):
        ExtraLevels(4, 4, -1)


def test_num_outputs_keeps_the_finest_levels_of_the_full_pyramid():
    info = [FeatureInfo(8, 8), FeatureInfo(16, 16), FeatureInfo(32, 32)]
    full = FPN(info, 16)
    one = FPN(info, 16, num_outputs=1)
    one.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith(("smooth.1", "smooth.2"))})
    feats = [torch.randn(2, c, 96 // s, 96 // s) for c, s in info]
    (p3,) = one(feats)
    torch.testing.assert_close(p3, full(feats)[0])
    assert one.feature_info == (FeatureInfo(16, 8),)
    with pytest.raises(ValueError, match="num_outputs"):
        FPN(info, 16, num_outputs=0)
    with pytest.raises(ValueError, match="extra_levels"):
        FPN(info, 16, num_outputs=2, extra_levels=1)
