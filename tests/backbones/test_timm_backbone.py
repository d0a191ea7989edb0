"""cvzoo/backbones/timm_backbone.py against timm's own feature extraction."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cvzoo.backbones import TimmBackbone
from cvzoo.types import FeatureInfo

timm = pytest.importorskip("timm")

CNN_FAMILIES = ["resnet18", "convnext_atto", "efficientnet_b0", "regnetx_002", "mobilenetv3_small_050"]
VIT = "vit_tiny_patch16_224"


def _rel(name: str) -> str:
    """Parameter name inside the timm model: TimmBackbone.model[.model].<name>."""
    return name.removeprefix("model.").removeprefix("model.")


def _perturb_norms(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)


@pytest.mark.parametrize(
    ("name", "out_indices"),
    [*((n, (-3, -2, -1)) for n in CNN_FAMILIES), ("resnet18", (1, 2)), ("efficientnet_b0", (0, 2, 4))],
)
def test_feature_info_matches_timm_and_outputs(name, out_indices):
    backbone = TimmBackbone(name, out_indices=out_indices).eval()
    ref = timm.create_model(name, features_only=True, out_indices=out_indices)
    expected = tuple(FeatureInfo(c, s) for c, s in zip(ref.feature_info.channels(), ref.feature_info.reduction()))
    assert backbone.feature_info == expected
    assert backbone.signature.min_size == expected[-1].stride
    with torch.no_grad():
        feats = backbone(torch.randn(2, 3, 96, 128))
    assert [tuple(f.shape) for f in feats] == [(2, f.channels, 96 // f.stride, 128 // f.stride) for f in expected]


def test_default_out_indices_are_strides_8_16_32():
    backbone = TimmBackbone("resnet18")
    assert backbone.feature_info == (FeatureInfo(128, 8), FeatureInfo(256, 16), FeatureInfo(512, 32))
    assert backbone.signature.outputs == ("c3", "c4", "c5")


def test_vit_simple_pyramid():
    backbone = TimmBackbone(VIT).eval()
    assert [f.stride for f in backbone.feature_info] == [8, 16, 32]
    assert backbone.signature.size_divisor == 16
    assert backbone.signature.min_size == 32
    with torch.no_grad():
        feats = backbone(torch.randn(2, 3, 96, 128))
    assert [tuple(f.shape) for f in feats] == [(2, f.channels, 96 // f.stride, 128 // f.stride)
                                               for f in backbone.feature_info]
    assert backbone.feature_info[1].channels == 192  # ViT-Ti width at the patch stride
    torch.testing.assert_close(feats[2], F.max_pool2d(feats[1], 2, 2))


def test_vit_pyramid_from_an_earlier_block():
    backbone = TimmBackbone(VIT, out_indices=(5,)).eval()
    assert backbone.feature_info == (FeatureInfo(96, 8), FeatureInfo(192, 16), FeatureInfo(192, 32))
    with torch.no_grad():
        feats = backbone(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(2, 96, 8, 8), (2, 192, 4, 4), (2, 192, 2, 2)]


def test_vit_single_channel_input():
    backbone = TimmBackbone(VIT, in_chans=1).eval()
    assert backbone.signature.in_channels == 1
    assert len(backbone.signature.mean) == len(backbone.signature.std) == 1
    with torch.no_grad():
        feats = backbone(torch.randn(2, 1, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(2, f.channels, 64 // f.stride, 64 // f.stride)
                                               for f in backbone.feature_info]


def test_cnn_single_channel_input():
    backbone = TimmBackbone("resnet18", in_chans=1).eval()
    assert backbone.signature.in_channels == 1
    assert backbone.signature.mean == (0.5,)
    with torch.no_grad():
        feats = backbone(torch.randn(2, 1, 64, 64))
    assert feats[-1].shape == (2, 512, 2, 2)


def test_local_pretrained_file_matches_timm(tmp_path):
    torch.manual_seed(0)
    ref = timm.create_model("resnet18")
    _perturb_norms(ref)
    ref.eval()
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    backbone = TimmBackbone("resnet18", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = backbone(x)
        expected = ref.forward_intermediates(x, indices=[2, 3, 4], intermediates_only=True)
    assert len(feats) == 3
    for got, want in zip(feats, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_vit_local_pretrained_patch_stride_level_is_last_block(tmp_path):
    torch.manual_seed(0)
    ref = timm.create_model("test_vit", dynamic_img_size=True).eval()  # timm's tiny ViT, patch 16
    path = tmp_path / "vit.pth"
    torch.save(ref.state_dict(), path)
    backbone = TimmBackbone("test_vit", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert backbone.signature.size_divisor == 16
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = backbone(x)
        (last,) = ref.forward_intermediates(x, indices=1, intermediates_only=True)  # the last block
    torch.testing.assert_close(feats[1], last, rtol=1e-5, atol=1e-5)  # stride 16: the block map itself


# (frozen_stages, parameter prefixes that must be frozen, a prefix that must stay trainable);
# levels follow timm's feature_info: stem, then each feature level (resnet18's level 0 is act1, stride 2;
# mobilenetv3's is bn1; blocks between two levels freeze with the later one)
FROZEN = {
    "resnet18": (2, ("conv1", "bn1", "layer1"), "layer2"),
    "convnext_atto": (2, ("stem_0", "stem_1", "stages_0", "stages_1"), "stages_2"),  # flattened names
    "efficientnet_b0": (2, ("conv_stem", "bn1", "blocks.0", "blocks.1"), "blocks.2"),
    "regnetx_002": (2, ("stem", "s1"), "s2"),
    "mobilenetv3_small_050": (2, ("conv_stem", "bn1", "blocks.0"), "blocks.1"),
    VIT: (1, ("patch_embed", "cls_token", "pos_embed", "blocks.0"), "blocks.1"),
}


@pytest.mark.parametrize("name", list(FROZEN))
def test_frozen_stages_requires_grad(name):
    frozen_stages, frozen, trainable = FROZEN[name]
    backbone = TimmBackbone(name, frozen_stages=frozen_stages)
    assert backbone.frozen_stages == frozen_stages
    seen_trainable = False
    for pname, p in backbone.named_parameters():
        rel = _rel(pname)
        should_freeze = any(rel == f or rel.startswith(f + ".") for f in frozen)
        assert p.requires_grad is not should_freeze, pname
        seen_trainable |= rel.startswith(trainable + ".")
    assert seen_trainable
    for f in frozen:  # every listed prefix names real parameters
        assert any(_rel(n) == f or _rel(n).startswith(f + ".") for n, _ in backbone.named_parameters()), f


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "regnetx_002", "mobilenetv3_small_050"])
def test_frozen_norms_stay_eval_and_keep_statistics(name):
    frozen_stages = FROZEN[name][0]
    backbone = TimmBackbone(name, frozen_stages=frozen_stages)
    backbone.train()
    frozen_bn = {n: m for n, m in backbone.named_modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters())}
    assert frozen_bn
    before = {n: m.running_mean.clone() for n, m in frozen_bn.items()}
    backbone(torch.randn(2, 3, 32, 32))
    still_training = [n for n, m in frozen_bn.items() if m.training]
    assert not still_training, f"frozen norm layers in train mode: {still_training}"
    drifted = [n for n, m in frozen_bn.items() if not torch.equal(m.running_mean, before[n])]
    assert not drifted, f"frozen norm layers updated their running statistics: {drifted}"
    trainable_bn = [m for m in backbone.modules()
                    if isinstance(m, nn.modules.batchnorm._BatchNorm) and any(p.requires_grad for p in m.parameters())]
    assert trainable_bn and all(m.training for m in trainable_bn)


def test_frozen_stages_out_of_range_raises():
    with pytest.raises(ValueError, match="frozen_stages"):
        TimmBackbone("resnet18", frozen_stages=6)  # stem + 5 feature levels: at most 5


# timm's tiny test models, one per feature wrapper (FeatureListNet, EfficientNetFeatures, FeatureGetterNet)
@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet", "test_vit"])
def test_grad_checkpointing_same_outputs_and_grads(name):
    torch.manual_seed(0)
    backbone = TimmBackbone(name).train()
    x = torch.randn(2, 3, 32, 32)

    def run():
        backbone.zero_grad()
        feats = backbone(x)
        sum(f.square().mean() for f in feats).backward()
        return [f.detach() for f in feats], {n: p.grad.clone() for n, p in backbone.named_parameters()}

    plain_out, plain_grad = run()
    backbone.set_grad_checkpointing(True)
    assert backbone.grad_checkpointing
    ckpt_out, ckpt_grad = run()
    for a, b in zip(ckpt_out, plain_out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for n in plain_grad:
        torch.testing.assert_close(ckpt_grad[n], plain_grad[n], rtol=1e-4, atol=1e-6, msg=n)


def test_missing_timm_raises_import_error_naming_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match=r"cvzoo\[timm\]"):
        TimmBackbone("resnet18")


def test_unknown_name_raises():
    with pytest.raises(ValueError, match="not_a_model_xyz"):
        TimmBackbone("not_a_model_xyz")


def test_bad_in_chans_raises():
    with pytest.raises(ValueError, match="in_chans"):
        TimmBackbone("resnet18", in_chans=0)
