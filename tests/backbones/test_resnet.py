"""cvzoo/backbones/resnet.py against torchvision's ResNet with shared weights."""

from __future__ import annotations

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from cvzoo.backbones import ResNet, resnet18, resnet50, resnet_micro
from cvzoo.types import FeatureInfo

LAYERS = ("layer1", "layer2", "layer3", "layer4")


def _perturb_norms(model: nn.Module) -> None:
    """Non-trivial BN statistics and affine parameters, so a wrongly wired norm cannot hide."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)


def _reference(name: str) -> nn.Module:
    torch.manual_seed(0)
    ref = getattr(torchvision.models, name)()
    _perturb_norms(ref)
    return ref.eval()


def _reference_features(ref: nn.Module, x: torch.Tensor, layers=LAYERS) -> list[torch.Tensor]:
    extractor = create_feature_extractor(ref, {name: name for name in layers})
    with torch.no_grad():
        out = extractor(x)
    return [out[name] for name in layers]


@pytest.mark.parametrize(("name", "builder"), [("resnet18", resnet18), ("resnet50", resnet50)])
def test_matches_torchvision_with_shared_weights(tmp_path, name, builder):
    ref = _reference(name)
    path = tmp_path / f"{name}.pth"
    torch.save(ref.state_dict(), path)
    model = builder(pretrained=str(path), out_indices=(0, 1, 2, 3)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model(x)
    expected = _reference_features(ref, x)
    assert len(feats) == 4
    for got, want in zip(feats, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_parameter_names_match_torchvision():
    model = resnet18(out_indices=(0, 1, 2, 3))
    ref = torchvision.models.resnet18()
    ref_shapes = {k: v.shape for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in model.state_dict().items()} == ref_shapes


def test_loads_safetensors_file(tmp_path):
    ref = _reference("resnet18")
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    model = resnet18(pretrained=str(path), out_indices=(1, 2, 3)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model(x)
    for got, want in zip(feats, _reference_features(ref, x, LAYERS[1:])):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_truncated_model_loads_full_checkpoint(tmp_path):
    ref = _reference("resnet18")
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    model = resnet18(pretrained=path, out_indices=(0, 1)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model(x)
    for got, want in zip(feats, _reference_features(ref, x, LAYERS[:2])):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_file_missing_keys_raises(tmp_path):
    state = _reference("resnet18").state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("layer3.")}
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match="layer3"):
        resnet18(pretrained=str(path), out_indices=(1, 2, 3))


def test_nonexistent_path_raises_naming_it(tmp_path):
    path = tmp_path / "nowhere" / "resnet18.pth"
    with pytest.raises(ValueError, match="nowhere"):
        resnet18(pretrained=str(path))


def test_checkpoint_of_other_widths_raises(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ValueError, match="shapes"):
        resnet_micro(pretrained=path)


@pytest.mark.parametrize(
    ("builder", "out_indices", "expected"),
    [
        (resnet_micro, (1, 2, 3), [(32, 8), (64, 16), (128, 32)]),
        (resnet_micro, (0, 1, 2, 3), [(16, 4), (32, 8), (64, 16), (128, 32)]),
        (resnet_micro, (0, 2), [(16, 4), (64, 16)]),
        (resnet18, (1, 2, 3), [(128, 8), (256, 16), (512, 32)]),
        (resnet50, (0, 1), [(256, 4), (512, 8)]),
    ],
)
def test_feature_info_declared_and_real(builder, out_indices, expected):
    model = builder(out_indices=out_indices).eval()
    assert model.feature_info == tuple(FeatureInfo(c, s) for c, s in expected)
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        feats = model(x)
    assert [tuple(f.shape) for f in feats] == [(2, c, 96 // s, 128 // s) for c, s in expected]


def test_signature():
    model = resnet_micro(in_channels=1)
    assert model.signature.in_channels == 1
    assert model.signature.min_size == 32
    assert model.signature.outputs == ("c3", "c4", "c5")
    feats = model.eval()(torch.randn(2, 1, 64, 64))
    assert feats[0].shape == (2, 32, 8, 8)


def test_odd_input_sizes_follow_conv_arithmetic():
    model = resnet_micro(out_indices=(0, 1, 2, 3)).eval()
    ref_sizes = []
    size = 65
    size = (size + 2 * 3 - 7) // 2 + 1  # conv1
    size = (size + 2 - 3) // 2 + 1  # maxpool
    for i in range(4):
        if i:
            size = (size + 2 - 3) // 2 + 1
        ref_sizes.append(size)
    with torch.no_grad():
        feats = model(torch.randn(2, 3, 65, 65))
    assert [f.shape[-1] for f in feats] == ref_sizes


def test_zero_init_residual_makes_blocks_identity_on_the_residual_path():
    model = resnet_micro(zero_init_residual=True)
    for block in model.layer1:
        assert torch.count_nonzero(block.bn2.weight) == 0
    model = resnet50(zero_init_residual=True, out_indices=(0,))
    assert all(torch.count_nonzero(b.bn3.weight) == 0 for b in model.layer1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"block": "resnext"},
        {"layers": (1, 1, 1), "widths": (8, 16, 32, 64)},
        {"layers": (1, 0, 1, 1), "widths": (8, 16, 32, 64)},
        {"in_channels": 0},
        {"out_indices": (4,)},
        {"out_indices": ()},
    ],
)
def test_constructor_validation(kwargs):
    with pytest.raises(ValueError):
        ResNet(**kwargs)
