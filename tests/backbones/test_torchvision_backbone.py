"""cvzoo/backbones/torchvision_backbone.py against torchvision's own models and feature extraction."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.ops import FrozenBatchNorm2d

from cvzoo.backbones import TorchvisionBackbone
from cvzoo.types import FeatureInfo

# default return layers: the last trunk module at each of the strides 8, 16, 32
EXPECTED = {
    "resnet18": (("layer2", "layer3", "layer4"), (128, 256, 512)),
    "mobilenet_v3_large": (("features.6", "features.12", "features.16"), (40, 112, 960)),
    "efficientnet_b0": (("features.3", "features.5", "features.8"), (40, 112, 1280)),
    "regnet_y_400mf": (("trunk_output.block2", "trunk_output.block3", "trunk_output.block4"), (104, 208, 440)),
    "convnext_tiny": (("features.3", "features.5", "features.7"), (192, 384, 768)),
}


def _reference(name: str) -> nn.Module:
    torch.manual_seed(0)
    ref = torchvision.models.get_model(name)
    with torch.no_grad():  # non-trivial statistics, so a wrong eps or a missed norm cannot hide
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.05, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
    return ref.eval()


def _reference_features(ref: nn.Module, layers, x: torch.Tensor) -> list[torch.Tensor]:
    extractor = create_feature_extractor(ref, {layer: layer for layer in layers})
    with torch.no_grad():
        out = extractor(x)
    return [out[layer] for layer in layers]


def _assert_close_scaled(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    """Max error relative to the map's largest value: FrozenBatchNorm2d folds the statistics into one
    scale and shift, so it rounds differently from BatchNorm2d on the large activations of a random net."""
    assert got.shape == want.shape
    err, scale = float((got - want).abs().max()), float(want.abs().max())
    assert err <= tol * scale, f"max error {err:.3g} exceeds {tol:g} x max |value| {scale:.3g}"


@pytest.mark.parametrize("name", list(EXPECTED))
def test_feature_info_declared_and_real(name):
    layers, channels = EXPECTED[name]
    backbone = TorchvisionBackbone(name).eval()
    assert backbone.feature_info == tuple(FeatureInfo(c, s) for c, s in zip(channels, (8, 16, 32)))
    assert backbone.return_layers == tuple(layer.replace(".", "_") for layer in layers)
    with torch.no_grad():
        feats = backbone(torch.randn(2, 3, 96, 128))
    assert [tuple(f.shape) for f in feats] == [(2, c, 96 // s, 128 // s) for c, s in zip(channels, (8, 16, 32))]


def test_default_layers_match_torchvision_feature_extractor(tmp_path):
    ref = _reference("resnet18")
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    backbone = TorchvisionBackbone("resnet18", weights=path)
    # with weights: FrozenBatchNorm2d and frozen_stages=1 (torchvision's trainable_layers=3)
    assert all(not isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())
    assert backbone.frozen_stages == 1
    for pname, p in backbone.named_parameters():
        frozen = pname.startswith(("body.conv1.", "body.layer1."))
        assert p.requires_grad is not frozen, pname
    assert any(p.requires_grad for p in backbone.body["layer2"].parameters())
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = backbone.eval()(x)
    expected = _reference_features(ref, ("layer2", "layer3", "layer4"), x)
    assert len(feats) == 3
    for got, want in zip(feats, expected):
        _assert_close_scaled(got, want)


@pytest.mark.parametrize("name", ["mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf", "mobilenet_v2"])
def test_local_weights_match_torchvision(tmp_path, name):
    """Frozen norm layers must keep the eps the weights were trained with (1e-3 for MobileNetV3)."""
    ref = _reference(name)
    path = tmp_path / f"{name}.pth"
    torch.save(ref.state_dict(), path)
    backbone = TorchvisionBackbone(name, weights=str(path)).eval()
    layers = [k.replace("trunk_output_", "trunk_output.").replace("features_", "features.")
              for k in backbone.return_layers]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = backbone(x)
    for got, want in zip(feats, _reference_features(ref, layers, x)):
        _assert_close_scaled(got, want)


def test_custom_return_layers():
    backbone = TorchvisionBackbone("resnet18", return_layers=("layer1", "layer3")).eval()
    assert backbone.feature_info == (FeatureInfo(64, 4), FeatureInfo(256, 16))
    assert "layer4" not in backbone.body  # nothing past the deepest returned map is built
    with torch.no_grad():
        feats = backbone(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(2, 64, 16, 16), (2, 256, 4, 4)]


def test_without_weights_uses_batchnorm_and_nothing_frozen():
    backbone = TorchvisionBackbone("resnet18")
    assert backbone.frozen_stages == -1
    assert any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    assert all(p.requires_grad for p in backbone.parameters())


def test_frozen_stages_by_stride_group():
    backbone = TorchvisionBackbone("resnet18", frozen_stages=2)
    frozen = {n.split(".")[1] for n, p in backbone.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1", "bn1", "layer1", "layer2"}
    backbone.train()
    assert not backbone.body["bn1"].training and not backbone.body["layer2"].training
    assert backbone.body["layer3"].training
    with pytest.raises(ValueError, match="frozen_stages"):
        TorchvisionBackbone("resnet18", frozen_stages=5)  # stride groups 2, 4, 8, 16, 32: at most 4


@pytest.mark.parametrize(
    ("name", "return_layers"), [("resnet18", ("layer1", "layer2")), ("mobilenet_v2", ("features.3", "features.6"))]
)
def test_grad_checkpointing_same_outputs_and_grads(name, return_layers):
    torch.manual_seed(0)
    backbone = TorchvisionBackbone(name, return_layers=return_layers).train()
    x = torch.randn(2, 3, 32, 32)

    def run():
        backbone.zero_grad()
        feats = backbone(x)
        sum(f.square().mean() for f in feats).backward()
        return [f.detach() for f in feats], {n: p.grad.clone() for n, p in backbone.named_parameters()}

    plain_out, plain_grad = run()
    backbone.set_grad_checkpointing(True)
    ckpt_out, ckpt_grad = run()
    for a, b in zip(ckpt_out, plain_out):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for n in plain_grad:
        torch.testing.assert_close(ckpt_grad[n], plain_grad[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", ["vgg16", "vit_b_16", "resnet_not_a_depth"])
def test_unknown_name_raises(name):
    with pytest.raises(ValueError, match=name):
        TorchvisionBackbone(name)


@pytest.mark.parametrize(
    "return_layers",
    [("layer2", "fc"), ("layer3", "layer2"), ("layer2", "layer2"), (), ("layer5",)],
)
def test_bad_return_layers_raise(return_layers):
    with pytest.raises(ValueError, match="return_layers"):
        TorchvisionBackbone("resnet18", return_layers=return_layers)


def test_missing_weights_file_raises(tmp_path):
    with pytest.raises(ValueError, match="missing_weights"):
        TorchvisionBackbone("resnet18", weights=tmp_path / "missing_weights.pth")


def _perturb_norms(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
    return model.eval()


def test_dilated_mobilenet_v3_matches_lraspp_backbone():
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    ref = _perturb_norms(lraspp_mobilenet_v3_large(weights=None, weights_backbone=None)).backbone
    backbone = TorchvisionBackbone("mobilenet_v3_large", return_layers=("features.4", "features.16"), dilated=True)
    # torchvision's IntermediateLayerGetter over `features` names its children "0", "1", ...
    backbone.body.load_state_dict({f"features_{k}": v for k, v in ref.state_dict().items()})
    backbone.eval()
    assert backbone.feature_info == (FeatureInfo(40, 8), FeatureInfo(960, 16))
    assert backbone.signature.outputs == ("c3", "c4")
    x = torch.randn(2, 3, 97, 75)
    with torch.no_grad():
        low, high = backbone(x)
        want = ref(x)
    torch.testing.assert_close(low, want["low"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(high, want["high"], rtol=1e-5, atol=1e-5)
    assert low.shape[-2:] == (13, 10) and high.shape[-2:] == (7, 5)


def test_dilated_defaults_take_the_strides_the_trunk_reaches():
    backbone = TorchvisionBackbone("mobilenet_v3_large", dilated=True)
    assert backbone.return_layers == ("features_6", "features_16")
    assert backbone.feature_info == (FeatureInfo(40, 8), FeatureInfo(960, 16))
    assert len(backbone.frozen_stage_modules()) == 4  # stride groups 2, 4, 8, 16


def test_dilated_resnet_declares_real_strides_and_matches_torchvision():
    replace = [False, True, True]
    torch.manual_seed(0)
    ref = _perturb_norms(torchvision.models.resnet50(replace_stride_with_dilation=replace))
    backbone = TorchvisionBackbone("resnet50", return_layers=("layer3", "layer4"), replace_stride_with_dilation=replace)
    backbone.body.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")})
    backbone.eval()
    assert backbone.feature_info == (FeatureInfo(1024, 8), FeatureInfo(2048, 8))
    assert backbone.signature.outputs == ("c3", "c3_2")
    x = torch.randn(1, 3, 61, 75)
    with torch.no_grad():
        feats = backbone(x)
    for got, want in zip(feats, _reference_features(ref, ("layer3", "layer4"), x)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
