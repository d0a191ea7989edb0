"""Segmenter.from_torchvision against torchvision's own FCN, DeepLabV3 and LR-ASPP models (the reference).

torchvision's segmentation models take ImageNet-normalised images and upsample their logits to the input
size, as Segmenter does: the same normalised batch must give the same "out" and "aux" logits, in eval mode
(running statistics, perturbed here so that batch norm is not the identity) and in train mode (batch
statistics; the same dropout masks under the same seed). The loss must equal torchvision's reference
training criterion (references/segmentation/train.py: cross-entropy with ignore_index=255 on "out" plus
0.5 x that on "aux"). Each ResNet-50 pair is built once (module-scoped fixture).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.segmentation import (
    deeplabv3_mobilenet_v3_large,
    deeplabv3_resnet50,
    fcn_resnet50,
    lraspp_mobilenet_v3_large,
)

from cvzoo.backbones import ResNet, TorchvisionBackbone
from cvzoo.heads import ASPPHead, FCNHead, LRASPPHead
from cvzoo.segmentation import SegmentationOutput, Segmenter
from cvzoo.types import IMAGENET_MEAN, IMAGENET_STD

K = 4
H, W = 97, 75  # odd: the upsampling to the input size must use size=, not a scale factor
BUILDERS = {"fcn": fcn_resnet50, "deeplabv3": deeplabv3_resnet50, "lraspp": lraspp_mobilenet_v3_large}


def _perturb_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.4 + 0.8)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.05)


def _build(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    tv = BUILDERS[name](weights=None, weights_backbone=None, num_classes=K, **kwargs)
    _perturb_bn(tv)
    return tv.eval()


@pytest.fixture(scope="module", params=list(BUILDERS))
def pair(request):
    tv = _build(request.param, **({} if request.param == "lraspp" else {"aux_loss": True}))
    model = Segmenter.from_torchvision(tv).eval()
    images = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(1))  # already normalised
    return request.param, tv, model, images


def _targets() -> torch.Tensor:
    y = torch.randint(0, K, (2, H, W), generator=torch.Generator().manual_seed(2))
    y[0, :20] = 255  # ignored rows
    y[1, :, -7:] = 255
    return y


def test_converted_structure(pair):
    name, tv, model, _ = pair
    assert isinstance(model, Segmenter) and model.num_classes == K
    assert model.ignore_index == 255 and model.aux_weight == 0.5  # torchvision's reference training criterion
    assert model.signature.mean == IMAGENET_MEAN and model.signature.std == IMAGENET_STD
    assert model.signature.outputs == SegmentationOutput._fields
    if name == "lraspp":
        assert isinstance(model.backbone, TorchvisionBackbone) and isinstance(model.head, LRASPPHead)
        assert [f.stride for f in model.backbone.feature_info] == [8, 16]  # dilated: "low" 8, "high" 16
        assert model.aux_head is None
    else:
        assert isinstance(model.backbone, ResNet)
        assert [f.stride for f in model.backbone.feature_info] == [8, 8]  # layer3 and layer4, output stride 8
        assert [f.channels for f in model.backbone.feature_info] == [1024, 2048]
        assert isinstance(model.head, FCNHead if name == "fcn" else ASPPHead)
        assert isinstance(model.aux_head, FCNHead) and model.aux_head.in_index == 0
    if name == "deeplabv3":
        assert model.head.atrous_rates == (12, 24, 36)


def test_eval_logits_equal_torchvision(pair):
    name, tv, model, images = pair
    with torch.no_grad():
        ref = tv(images)
        out = model(images)
    assert out.logits.shape == ref["out"].shape == (2, K, H, W)
    assert ref["out"].std() > 1e-3  # the comparison is not between near-constant maps
    torch.testing.assert_close(out.logits, ref["out"], atol=1e-4, rtol=1e-4)
    if name == "lraspp":
        assert out.aux_logits is None and "aux" not in ref
    else:
        assert out.aux_logits.shape == ref["aux"].shape == (2, K, H, W)
        torch.testing.assert_close(out.aux_logits, ref["aux"], atol=1e-4, rtol=1e-4)


def test_train_mode_logits_equal_torchvision(pair):
    name, tv, model, images = pair
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in (tv, model)]
    try:
        tv.train()
        model.train()
        with torch.no_grad():
            torch.manual_seed(11)  # the same dropout masks (FCN heads p=0.1, ASPP projection p=0.5)
            ref = tv(images)
            torch.manual_seed(11)
            out = model(images)
            tv.eval()
            eval_out = tv(images)["out"]
        assert not torch.allclose(ref["out"], eval_out, atol=1e-3)  # batch statistics really differ
        torch.testing.assert_close(out.logits, ref["out"], atol=1e-4, rtol=1e-4)
        if name != "lraspp":
            torch.testing.assert_close(out.aux_logits, ref["aux"], atol=1e-4, rtol=1e-4)
    finally:  # running statistics moved in train mode: restore them for the other tests
        for m, state in zip((tv, model), saved):
            m.load_state_dict(state)
            m.eval()


def test_loss_equals_torchvision_reference_criterion(pair):
    name, tv, model, images = pair
    y = _targets()
    with torch.no_grad():
        ref = tv(images)
        losses = model.loss(images, y)
    expected = F.cross_entropy(ref["out"], y, ignore_index=255)
    if name != "lraspp":
        expected = expected + 0.5 * F.cross_entropy(ref["aux"], y, ignore_index=255)
    assert set(losses) == ({"loss", "ce"} if name == "lraspp" else {"loss", "ce", "aux"})
    torch.testing.assert_close(losses["loss"], expected, atol=1e-4, rtol=1e-4)


def test_fcn_without_aux_classifier_gives_no_aux_logits():
    tv = _build("fcn", aux_loss=False)
    assert tv.aux_classifier is None
    model = Segmenter.from_torchvision(tv).eval()
    assert model.aux_head is None
    images = torch.randn(1, 3, 41, 35, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(images)
        ref = tv(images)
    assert out.aux_logits is None and "aux" not in ref
    torch.testing.assert_close(out.logits, ref["out"], atol=1e-4, rtol=1e-4)
    assert set(model.loss(images, torch.zeros(1, 41, 35, dtype=torch.long))) == {"loss", "ce"}


@pytest.mark.parametrize("build", [
    lambda: torchvision.models.resnet18(weights=None),  # a classifier
    lambda: deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=K),  # not on a ResNet
    lambda: nn.Conv2d(3, K, 1),
], ids=["resnet18", "deeplabv3_mobilenet", "conv"])
def test_non_segmentation_model_raises(build):
    with pytest.raises(ValueError, match="from_torchvision expects"):
        Segmenter.from_torchvision(build())
