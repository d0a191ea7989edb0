"""cvzoo.heads.segmentation: output shapes at odd sizes, torchvision's FCN / DeepLabV3 / LR-ASPP heads with
copied weights as the reference, FPNSegHead and UNetDecoder against forwards written here from the papers'
definitions (composing the heads' own submodules by hand), and validation.

Batch-norm statistics and affine parameters are perturbed so that eval mode is not the identity.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.models.segmentation.fcn import FCNHead as TVFCNHead
from torchvision.models.segmentation.lraspp import LRASPPHead as TVLRASPPHead

from cvzoo.backbones import resnet_micro
from cvzoo.heads import ASPPHead, FCNHead, FPNSegHead, LRASPPHead, UNetDecoder
from cvzoo.heads.segmentation import ASPPPooling
from cvzoo.types import FeatureInfo

K = 5
ODD_SIZES = [(61, 83), (97, 75), (33, 47)]


def _perturb_bn(module: nn.Module, seed: int = 3) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return module


def _feats(size: tuple[int, int], output_stride: int = 32, batch: int = 2):
    torch.manual_seed(0)
    backbone = resnet_micro(out_indices=(0, 1, 2, 3), output_stride=output_stride).eval()
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = backbone(x)
    return backbone.feature_info, feats


def _expected_size(size: tuple[int, int], stride: int) -> tuple[int, int]:
    # every stride-2 layer of the ResNet (7x7/2 pad 3, maxpool 3/2 pad 1, 3x3/2 pad 1) maps n -> ceil(n / 2)
    return math.ceil(size[0] / stride), math.ceil(size[1] / stride)


# ---- output shapes ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", ODD_SIZES)
@pytest.mark.parametrize("output_stride", [32, 8])
def test_output_shape_at_the_stride_of_the_output_level(size, output_stride):
    info, feats = _feats(size, output_stride)
    assert [f.stride for f in info] == ([4, 8, 16, 32] if output_stride == 32 else [4, 8, 8, 8])
    for f, fi in zip(feats, info):  # the declared strides are the real ones
        assert tuple(f.shape[-2:]) == _expected_size(size, fi.stride)
    heads = {  # head -> index of its output level
        FCNHead(info[-1].channels, K): -1,
        FCNHead(info[2].channels, K, in_index=2): 2,
        ASPPHead(info[-1].channels, K, atrous_rates=(2, 4, 6), channels=32): -1,
        ASPPHead(info[1].channels, K, atrous_rates=(1, 3), channels=16, in_index=1): 1,
        FPNSegHead(info, K, channels=16): 0,
        UNetDecoder(info, K): 0,
        LRASPPHead(info[1].channels, info[3].channels, K, inter_channels=16, low_index=1, high_index=3): 1,
    }
    for head, level in heads.items():
        with torch.no_grad():
            out = head.eval()(feats)
        expected = (2, K, *_expected_size(size, info[level].stride))
        assert tuple(out.shape) == expected, f"{type(head).__name__}: {tuple(out.shape)} != {expected}"
        assert torch.isfinite(out).all()


# ---- torchvision's heads as the reference -----------------------------------------------------------------

@pytest.mark.parametrize("train", [False, True])
def test_fcn_head_equals_torchvision(train):
    info, feats = _feats((61, 83), output_stride=8)
    ref = _perturb_bn(TVFCNHead(info[-1].channels, K)).train(train)
    head = FCNHead(info[-1].channels, K).train(train)
    head.load_state_dict(ref.state_dict())  # the same nn.Sequential layout: keys copy one to one
    assert head[3].p == ref[3].p == 0.1
    torch.manual_seed(7)  # the same dropout mask in train mode
    expected = ref(feats[-1])
    torch.manual_seed(7)
    torch.testing.assert_close(head(feats), expected, atol=1e-5, rtol=1e-5)


def _aspp_key(key: str, num_rates: int) -> str:
    """torchvision DeepLabHead state-dict key -> cvzoo ASPPHead key (the mapping of
    cvzoo/segmentation/torchvision_interop.py, written out here as a table of patterns)."""
    pool = num_rates + 1  # torchvision's ASPPPooling: (pool, conv, bn, relu); cvzoo's: conv = ConvNormAct(conv, bn)
    rules = [
        (rf"^0\.convs\.{pool}\.1\.(.*)$", rf"branches.{pool}.conv.0.\1"),
        (rf"^0\.convs\.{pool}\.2\.(.*)$", rf"branches.{pool}.conv.1.\1"),
        (r"^0\.convs\.(\d+)\.(.*)$", r"branches.\1.\2"),
        (r"^0\.project\.(.*)$", r"project.0.\1"),
        (r"^1\.(.*)$", r"fuse.0.\1"),
        (r"^2\.(.*)$", r"fuse.1.\1"),
        (r"^4\.(.*)$", r"classifier.\1"),
    ]
    for pattern, repl in rules:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    raise AssertionError(f"unmapped torchvision key {key}")


@pytest.mark.parametrize("train", [False, True])
def test_aspp_head_equals_torchvision_deeplab_head(train):
    info, feats = _feats((61, 83), output_stride=8)
    rates = (2, 4, 6)  # dilations that matter on an 8 x 11 map
    ref = _perturb_bn(DeepLabHead(info[-1].channels, K, atrous_rates=rates)).train(train)
    head = ASPPHead(info[-1].channels, K, atrous_rates=rates, channels=256).train(train)
    head.load_state_dict({_aspp_key(k, len(rates)): v for k, v in ref.state_dict().items()})  # strict: all keys
    assert [b[0].dilation[0] for b in head.branches[1:-1]] == list(rates)
    torch.manual_seed(7)  # the same dropout (p=0.5 after the projection) in train mode
    expected = ref(feats[-1])
    torch.manual_seed(7)
    got = head(feats)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert expected.std() > 0.01  # not a degenerate comparison


def test_aspp_image_pooling_broadcasts_the_global_feature():
    torch.manual_seed(0)
    pool = _perturb_bn(ASPPPooling(6, 4, nn.BatchNorm2d)).eval()
    x = torch.randn(2, 6, 5, 7)
    conv, bn = pool.conv[0], pool.conv[1]
    mean = x.mean(dim=(2, 3))  # (B, 6) global average
    z = mean @ conv.weight[:, :, 0, 0].T  # 1x1 conv, no bias (the norm absorbs it)
    expected = torch.relu((z - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias)
    with torch.no_grad():
        out = pool(x)
    assert out.shape == (2, 4, 5, 7)
    torch.testing.assert_close(out, expected[:, :, None, None].expand(2, 4, 5, 7), atol=1e-6, rtol=1e-5)
    assert (expected > 0).any()  # the ReLU does not zero everything


@pytest.mark.parametrize("train", [False, True])
def test_lraspp_head_equals_torchvision(train):
    info, feats = _feats((97, 75))
    ref = _perturb_bn(TVLRASPPHead(info[1].channels, info[3].channels, K, 24)).train(train)
    head = LRASPPHead(info[1].channels, info[3].channels, K, inter_channels=24, low_index=1, high_index=3)
    head.train(train).load_state_dict(ref.state_dict())
    expected = ref({"low": feats[1], "high": feats[3]})
    torch.testing.assert_close(head(feats), expected, atol=1e-5, rtol=1e-5)


# ---- FPNSegHead and UNetDecoder against forwards written from the papers -----------------------------------

def _up2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def _fpnseg_reference(head: FPNSegHead, feats, exact_2x: bool) -> torch.Tensor:
    """Panoptic FPN (Kirillov et al. 2019, Fig. 3): level l at stride 4 * 2**l goes through max(1, l) stages of
    3x3 conv-norm-ReLU, each followed by 2x bilinear upsampling for l > 0; the stride-4 maps are summed and
    a 1x1 conv gives the classes. With sizes divisible by 32 every upsampling is an exact 2x (scale_factor=2,
    as in detectron2's SemSegFPNHead); for odd sizes each is 2x except the last, which lands on the finest
    map's size (the docstring's definition)."""
    target = feats[0].shape[-2:]
    total = 0
    for level, (f, blocks) in enumerate(zip(feats, head.stages)):
        assert len(blocks) == max(1, level)  # strides (4, 8, 16, 32)
        x = f
        for i, block in enumerate(blocks):
            x = block[2](block[1](block[0](x)))  # conv, norm, ReLU
            if level > 0:
                if exact_2x or i < len(blocks) - 1:
                    x = _up2(x)
                else:
                    x = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
        total = total + x
    return head.classifier(total)


@pytest.mark.parametrize("size", [(64, 96), (61, 83), (97, 75)])
def test_fpnseg_head_equals_reference_forward(size):
    info, feats = _feats(size)
    head = _perturb_bn(FPNSegHead(info, K, channels=16)).eval()
    with torch.no_grad():
        expected = _fpnseg_reference(head, feats, exact_2x=size[0] % 32 == 0 and size[1] % 32 == 0)
        got = head(feats)
    assert tuple(got.shape[-2:]) == tuple(feats[0].shape[-2:])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _unet_reference(head: UNetDecoder, feats) -> torch.Tensor:
    """U-Net (Ronneberger et al. 2015): from the deepest map up, upsample to the skip's size, concatenate
    [upsampled, skip] along channels, two 3x3 conv-norm-ReLU; a 1x1 conv at the finest level."""
    x = feats[-1]
    for j, skip in enumerate(reversed(feats[:-1])):
        first, second = head.blocks[j][0], head.blocks[j][1]
        x = torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False), skip], dim=1)
        x = first[2](first[1](first[0](x)))
        x = second[2](second[1](second[0](x)))
    return head.classifier(x)


@pytest.mark.parametrize("size", [(64, 96), (61, 83)])
def test_unet_decoder_equals_reference_forward(size):
    info, feats = _feats(size)
    head = _perturb_bn(UNetDecoder(info, K, channels=(8, 12, 20))).eval()
    # decoder widths: the block that ends at level i has channels[i] (levels 2, 1, 0 from the deepest up)
    assert [b[1][0].out_channels for b in head.blocks] == [20, 12, 8]
    assert [b[0][0].in_channels for b in head.blocks] == [128 + 64, 20 + 32, 12 + 16]
    with torch.no_grad():
        torch.testing.assert_close(head(feats), _unet_reference(head, feats), atol=1e-5, rtol=1e-5)


def test_unet_decoder_default_widths():
    info, _ = _feats((64, 64))
    head = UNetDecoder(info, K)
    assert [b[1][0].out_channels for b in head.blocks] == [32, 16, 16]  # max(16, C_l / 2) at levels 2, 1, 0


# ---- validation -------------------------------------------------------------------------------------------

INFO = (FeatureInfo(16, 4), FeatureInfo(32, 8), FeatureInfo(64, 16), FeatureInfo(128, 32))


@pytest.mark.parametrize("build, match", [
    (lambda: FCNHead(0, K), "in_channels=0"),
    (lambda: FCNHead(16, 0), "num_classes=0"),
    (lambda: FCNHead(16, 2.5), "num_classes=2.5"),
    (lambda: FCNHead(16, True), "num_classes=True"),
    (lambda: ASPPHead(16, K, channels=0), "channels=0"),
    (lambda: ASPPHead(16, K, atrous_rates=(6, 0)), "rate_1=0"),
    (lambda: ASPPHead(16, -1), "num_classes=-1"),
    (lambda: FPNSegHead(INFO, 0), "num_classes=0"),
    (lambda: FPNSegHead(INFO, K, channels=0), "channels=0"),
    (lambda: FPNSegHead((), K), "at least one level"),
    (lambda: FPNSegHead(INFO[::-1], K), "must not decrease"),
    (lambda: UNetDecoder(INFO, 0), "num_classes=0"),
    (lambda: UNetDecoder(INFO, K, channels=(8, 8)), "one width per level but the deepest"),
    (lambda: UNetDecoder(INFO, K, channels=(8, 0, 8)), "level_1=0"),
    (lambda: UNetDecoder(INFO, K, channels=(8, 8, 8, 8)), "one width per level but the deepest"),
    (lambda: UNetDecoder(INFO[::-1], K), "must not decrease"),
    (lambda: LRASPPHead(16, 128, K, inter_channels=0), "inter_channels=0"),
    (lambda: LRASPPHead(0, 128, K), "low_channels=0"),
])
def test_constructor_errors(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_wrong_input_channels_and_level_counts_raise():
    _, feats = _feats((61, 83))
    cases = [
        (FCNHead(64, K), feats, "128 channels|64 channels"),  # level -1 has 128 channels
        (FCNHead(128, K, in_index=4), feats, "reads level 4 but got 4"),
        (ASPPHead(32, K, atrous_rates=(2,), channels=8), feats, "32 channels"),
        (ASPPHead(128, K, atrous_rates=(2,), channels=8), feats[:0], "got 0 feature maps"),
        (LRASPPHead(16, 128, K, low_index=1), feats, "16 channels"),  # level 1 has 32
        (LRASPPHead(32, 64, K, low_index=1, high_index=3), feats, "64 channels"),
        (FPNSegHead(INFO, K, channels=8), feats[:3], "built for 4 levels, got 3"),
        (UNetDecoder(INFO, K), feats[1:], "built for 4 levels, got 3"),
    ]
    for head, inputs, match in cases:
        with pytest.raises(ValueError, match=match):
            head.eval()(inputs)


@pytest.mark.parametrize("cls", [FPNSegHead, UNetDecoder])
def test_wrong_channels_at_a_level_raise_value_error(cls):
    _, feats = _feats((61, 83))
    head = cls(INFO, K).eval()
    bad = list(feats)
    bad[1] = torch.randn(2, 7, *feats[1].shape[-2:])  # 7 channels where feature_info says 32
    with pytest.raises(ValueError, match="32"):
        head(bad)
