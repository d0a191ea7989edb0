"""cvzoo/backbones/resnet.py `output_stride` against torchvision's `replace_stride_with_dilation`."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from cvzoo.backbones import ResNet, resnet18, resnet50
from cvzoo.types import FeatureInfo

REPLACE = {8: [False, True, True], 16: [False, False, True], 32: [False, False, False]}


def _reference(output_stride: int) -> nn.Module:
    torch.manual_seed(0)
    ref = torchvision.models.resnet50(replace_stride_with_dilation=REPLACE[output_stride])
    with torch.no_grad():  # non-trivial statistics, so a wrongly wired norm cannot hide
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
    return ref.eval()


@pytest.mark.parametrize("output_stride", [8, 16])
def test_matches_torchvision_replace_stride_with_dilation(output_stride):
    ref = _reference(output_stride)
    model = ResNet(layers=(3, 4, 6, 3), block="bottleneck", out_indices=(2, 3), output_stride=output_stride)
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    model.load_state_dict(state)  # strict: parameter names and shapes unchanged by dilation
    model.eval()
    x = torch.randn(1, 3, 61, 75)  # odd size: padding = dilation must keep every map's size
    with torch.no_grad():
        feats = model(x)
        want = create_feature_extractor(ref, {"layer3": "layer3", "layer4": "layer4"})(x)
    for got, name in zip(feats, ("layer3", "layer4")):
        assert got.shape == want[name].shape
        torch.testing.assert_close(got, want[name], rtol=1e-5, atol=1e-5)


def test_dilations_follow_torchvision_make_layer():
    ref = torchvision.models.resnet50(replace_stride_with_dilation=REPLACE[8])
    model = resnet50(out_indices=(0, 1, 2, 3), output_stride=8)
    for i in range(1, 5):
        ours, theirs = getattr(model, f"layer{i}"), getattr(ref, f"layer{i}")
        assert [(b.conv2.stride, b.conv2.dilation, b.conv2.padding) for b in ours] == [
            (b.conv2.stride, b.conv2.dilation, b.conv2.padding) for b in theirs
        ], f"layer{i}"


@pytest.mark.parametrize(
    ("output_stride", "strides"),
    [(8, (4, 8, 8, 8)), (16, (4, 8, 16, 16)), (32, (4, 8, 16, 32))],
)
@pytest.mark.parametrize("builder", [resnet18, resnet50])
def test_feature_info_declares_real_strides(builder, output_stride, strides):
    model = builder(out_indices=(0, 1, 2, 3), output_stride=output_stride).eval()
    assert [f.stride for f in model.feature_info] == list(strides)
    assert model.signature.min_size == output_stride
    assert len(set(model.signature.outputs)) == 4  # unique names although strides repeat
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape[-2:]) for f in feats] == [(64 // s, 96 // s) for s in strides]
    assert [f.shape[1] for f in feats] == [f.channels for f in model.feature_info]


def test_basic_block_dilates_both_convs():
    model = resnet18(out_indices=(2, 3), output_stride=8)
    assert model.feature_info == (FeatureInfo(256, 8), FeatureInfo(512, 8))
    # first block of a dilated stage: the previous dilation; the following blocks: the new one
    assert [(b.conv1.dilation[0], b.conv2.dilation[0]) for b in model.layer3] == [(1, 1), (2, 2)]
    assert [(b.conv1.dilation[0], b.conv2.dilation[0]) for b in model.layer4] == [(2, 2), (4, 4)]
    assert all(b.conv1.padding == b.conv1.dilation and b.conv2.padding == b.conv2.dilation
               for b in (*model.layer3, *model.layer4))
    assert all(b.conv1.stride == (1, 1) for b in (*model.layer3, *model.layer4))


@pytest.mark.parametrize("output_stride", [4, 64, 12, 0, "8"])
def test_bad_output_stride_raises_naming_it(output_stride):
    with pytest.raises(ValueError, match="output_stride") as err:
        ResNet(output_stride=output_stride)
    assert repr(output_stride) in str(err.value)
