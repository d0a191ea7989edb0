"""cvzoo.necks.compose.BackboneWithNeck: the neck's pyramid exposed as one feature extractor."""

from __future__ import annotations

import math

import pytest
import torch

from cvzoo.backbones import resnet_micro
from cvzoo.necks import FPN, PAN, BackboneWithNeck, BiFPN
from cvzoo.types import FeatureInfo

NECKS = {
    "fpn": lambda info: FPN(info, 8, extra_levels=2),
    "pan": lambda info: PAN(info, 8),
    "bifpn": lambda info: BiFPN(info, 8, num_repeats=1, extra_levels=2),
}


@pytest.mark.parametrize("name", list(NECKS))
def test_backbone_with_neck_exposes_the_neck_pyramid(name):
    torch.manual_seed(0)
    backbone = resnet_micro()
    neck = NECKS[name](backbone.feature_info)
    model = BackboneWithNeck(backbone, neck).eval()
    assert model.feature_info == neck.feature_info
    assert model.num_levels == len(neck.feature_info)
    expected_names = tuple(f"p{round(math.log2(f.stride))}" for f in neck.feature_info)
    assert model.signature.outputs == expected_names
    assert expected_names[0] == "p3"
    # everything but the outputs stays the backbone's
    assert model.signature.replace(outputs=()) == backbone.signature.replace(outputs=())

    x = torch.randn(2, 3, 97, 131)
    with torch.no_grad():
        out = model(x)
        ref = neck(backbone(x))
    assert len(out) == len(model.feature_info)
    for o, r, f in zip(out, ref, model.feature_info):
        assert o.shape[1] == f.channels
        assert abs(o.shape[2] - math.ceil(97 / f.stride)) <= 1
        assert abs(o.shape[3] - math.ceil(131 / f.stride)) <= 1
        torch.testing.assert_close(o, r)


def test_backbone_with_neck_fpn_names_p3_to_p7():
    backbone = resnet_micro()
    model = BackboneWithNeck(backbone, FPN(backbone.feature_info, 8, extra_levels=2))
    assert model.signature.outputs == ("p3", "p4", "p5", "p6", "p7")
    assert model.feature_info == tuple(FeatureInfo(8, s) for s in (8, 16, 32, 64, 128))
