"""cvzoo/backbones/convnext.py against timm's ConvNeXt with shared weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cvzoo.backbones import ConvNeXt, convnext_atto, convnext_micro
from cvzoo.types import FeatureInfo

timm = pytest.importorskip("timm")
from timm.models.convnext import ConvNeXt as TimmConvNeXt  # noqa: E402

MICRO = {"depths": (1, 1, 1, 1), "dims": (16, 32, 64, 128)}


def _perturb(model: nn.Module) -> None:
    """Layer scale of order one and non-trivial norm affines, so every block visibly shapes the output."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
            elif "norm" in name or "stem.1" in name or "downsample.0" in name:
                p.add_(torch.randn_like(p) * 0.2)


def _timm_reference(tmp_path, **kwargs) -> tuple[nn.Module, str]:
    torch.manual_seed(0)
    ref = TimmConvNeXt(**kwargs)
    _perturb(ref)
    ref.eval()
    path = tmp_path / "timm_convnext.pth"
    torch.save(ref.state_dict(), path)
    return ref, str(path)


def _timm_features(ref: nn.Module, x: torch.Tensor, indices) -> list[torch.Tensor]:
    with torch.no_grad():
        return ref.forward_intermediates(x, indices=list(indices), intermediates_only=True)


@pytest.mark.parametrize("conv_mlp", [False, True])
@pytest.mark.parametrize("ls_init_value", [1e-6, None])
def test_micro_matches_timm(tmp_path, conv_mlp, ls_init_value):
    ref, path = _timm_reference(tmp_path, **MICRO, conv_mlp=conv_mlp, ls_init_value=ls_init_value)
    model = convnext_micro(pretrained=path, out_indices=(0, 1, 2, 3), layer_scale_init=ls_init_value).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = model(x)
    expected = _timm_features(ref, x, (0, 1, 2, 3))
    assert len(feats) == 4
    for got, want in zip(feats, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_atto_matches_timm(tmp_path):
    torch.manual_seed(0)
    ref = timm.create_model("convnext_atto", pretrained=False)  # conv_mlp=True, depths (2, 2, 6, 2)
    _perturb(ref)
    ref.eval()
    path = tmp_path / "atto.pth"
    torch.save(ref.state_dict(), path)
    model = convnext_atto(pretrained=path).eval()
    assert model.feature_info == (FeatureInfo(80, 8), FeatureInfo(160, 16), FeatureInfo(320, 32))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model(x)
    for got, want in zip(feats, _timm_features(ref, x, (1, 2, 3))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_drop_path_rates_follow_timm():
    depths, dims = (2, 1, 3, 2), (8, 16, 32, 64)
    ref = TimmConvNeXt(depths=depths, dims=dims, drop_path_rate=0.3)
    model = ConvNeXt(depths=depths, dims=dims, drop_path_rate=0.3, out_indices=(0, 1, 2, 3))
    want = [getattr(b.drop_path, "drop_prob", 0.0) for s in ref.stages for b in s.blocks]
    got = [getattr(b.drop_path, "p", 0.0) for s in model.stages for b in s.blocks]
    assert got == pytest.approx(want)
    assert got[-1] == pytest.approx(0.3)


def test_drop_path_changes_train_outputs_but_not_eval(tmp_path):
    _, path = _timm_reference(tmp_path, **MICRO)
    plain = convnext_micro(pretrained=path, out_indices=(0, 1, 2, 3))
    dropped = convnext_micro(pretrained=path, out_indices=(0, 1, 2, 3), drop_path_rate=0.5)
    x = torch.randn(4, 3, 64, 64)
    plain.train()
    dropped.train()
    torch.manual_seed(1)
    with torch.no_grad():
        train_plain = plain(x)
        train_dropped = dropped(x)
    # stage 0's single block has rate 0 (linear from 0); the deepest one has 0.5
    torch.testing.assert_close(train_dropped[0], train_plain[0])
    assert not torch.allclose(train_dropped[-1], train_plain[-1], atol=1e-4)
    plain.eval()
    dropped.eval()
    with torch.no_grad():
        for a, b in zip(dropped(x), plain(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("out_indices", "expected"),
    [((1, 2, 3), [(32, 8), (64, 16), (128, 32)]), ((0,), [(16, 4)]), ((0, 2), [(16, 4), (64, 16)])],
)
def test_feature_info_declared_and_real(out_indices, expected):
    model = convnext_micro(out_indices=out_indices).eval()
    assert model.feature_info == tuple(FeatureInfo(c, s) for c, s in expected)
    with torch.no_grad():
        feats = model(torch.randn(2, 3, 96, 128))
    assert [tuple(f.shape) for f in feats] == [(2, c, 96 // s, 128 // s) for c, s in expected]


def test_in_channels(tmp_path):
    ref, path = _timm_reference(tmp_path, **MICRO, in_chans=1)
    model = convnext_micro(pretrained=path, in_channels=1, out_indices=(0, 1, 2, 3)).eval()
    assert model.signature.in_channels == 1
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        for got, want in zip(model(x), _timm_features(ref, x, (0, 1, 2, 3))):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_checkpoint_of_other_dims_raises(tmp_path):
    _, path = _timm_reference(tmp_path, depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))
    with pytest.raises(ValueError, match="shapes"):
        convnext_micro(pretrained=path)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"depths": (1, 1, 1), "dims": (8, 16, 32, 64)},
        {"depths": (1, 0, 1, 1), "dims": (8, 16, 32, 64)},
        {"drop_path_rate": 1.0},
        {"drop_path_rate": -0.1},
        {"in_channels": 0},
        {"out_indices": (2, 1)},
    ],
)
def test_constructor_validation(kwargs):
    with pytest.raises(ValueError):
        ConvNeXt(**kwargs)
