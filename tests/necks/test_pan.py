"""cvzoo.necks.pan: the bottom-up path against its closed form (PANet / MMDetection PAFPN)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cvzoo.necks import PAN
from cvzoo.types import FeatureInfo

INFO = (FeatureInfo(6, 8), FeatureInfo(10, 16), FeatureInfo(12, 32))
SIZES = ((13, 17), (7, 9), (4, 5))


def _feats(sizes=SIZES) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, f.channels, h, w, generator=g) for f, (h, w) in zip(INFO, sizes)]


@pytest.mark.parametrize("sizes", [SIZES, ((12, 16), (6, 8), (3, 4))], ids=["ceil", "floor"])
def test_pan_bottom_up_matches_closed_form(sizes):
    # without norm and act: N_0 = P_0, N_{i+1} = conv3x3(P_{i+1} + resize(conv3x3_s2(N_i)))
    torch.manual_seed(0)
    pan = PAN(INFO, 8, norm_layer=None, act_layer=None)
    feats = _feats(sizes)
    p = pan.fpn(feats)
    n = [p[0]]
    for down, fuse, lateral in zip(pan.downsample, pan.fuse, p[1:]):
        d = F.conv2d(n[-1], down[0].weight, down[0].bias, stride=2, padding=1)
        d = F.interpolate(d, size=lateral.shape[-2:], mode="nearest")
        n.append(F.conv2d(lateral + d, fuse[0].weight, fuse[0].bias, padding=1))
    out = pan(feats)
    assert len(out) == 3
    for a, b in zip(out, n):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_pan_extra_levels_come_from_last_bottom_up_output():
    torch.manual_seed(0)
    pan = PAN(INFO, 8, extra_levels=1, extra_mode="maxpool").eval()
    out = pan(_feats())
    assert len(out) == 4
    torch.testing.assert_close(out[3], out[2][:, :, ::2, ::2])


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        (dict(feature_info=[]), "feature_info"),
        (dict(feature_info=[FeatureInfo(4, 16), FeatureInfo(8, 8)]), "feature_info"),
        (dict(feature_info=[FeatureInfo(4, 8), FeatureInfo(8, 8)]), r"PAN feature_info.*strictly increase.*\[8, 8\]"),
        (dict(out_channels=0), "out_channels"),
        (dict(extra_levels=-1), "extra_levels"),
        (dict(extra_levels=1, extra_mode="avgpool"), "extra_mode"),
    ],
    ids=["empty", "decreasing", "equal-strides", "out0", "extra-neg", "mode"],
)
def test_pan_rejects_bad_constructor_args(kwargs, arg):
    kwargs = {"feature_info": INFO, "out_channels": 8, **kwargs}
    with pytest.raises(ValueError, match=arg):
        PAN(**kwargs)
