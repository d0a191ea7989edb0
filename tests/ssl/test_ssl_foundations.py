"""The shared parts of the SSL methods: momentum schedule and EMA update, projection heads, views."""

import math

import pytest
import torch
from torch import nn

from cvzoo.ssl.heads import MLPHead
from cvzoo.ssl.momentum import cosine_momentum, momentum_copy, update_momentum
from cvzoo.ssl.views import MultiCrop, TwoViews, denormalize, ssl_augmentation
from cvzoo.types import Signature

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- momentum ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("base,final", [(0.996, 1.0), (0.9, 0.99), (0.5, 0.5)])
def test_cosine_momentum_closed_form(base, final):
    max_steps = 10
    for step in (0, 1, 3, 5, 9, 10, 11, 50):
        progress = min(step / max_steps, 1.0)
        expected = base + (final - base) * (1 - math.cos(math.pi * progress)) / 2
        got = cosine_momentum(step, max_steps, base, final)
        assert got.shape == () and got.dtype == torch.float32
        assert got.item() == pytest.approx(expected, abs=1e-6)
    steps = torch.tensor([0, 5, 10], dtype=torch.long)  # a step-counter tensor works too
    torch.testing.assert_close(cosine_momentum(steps, max_steps, base, final),
                               torch.tensor([base, (base + final) / 2, final]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [({"max_steps": 0}, "max_steps"), ({"max_steps": 2.5}, "max_steps"),
                                          ({"base": 1.5}, "base"), ({"final": -0.1}, "final")])
def test_cosine_momentum_validation(kwargs, match):
    args = {"step": 0, "max_steps": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        cosine_momentum(**args)


def _net_with_buffers(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    net.train()
    for _ in range(seed + 1):  # distinct running statistics and num_batches_tracked
        net(torch.randn(5, 3))
    return net


@pytest.mark.parametrize("momentum", [0.9, torch.tensor(0.75), 0.0, 1.0])
def test_update_momentum_equals_hand_ema(momentum):
    online, target = _net_with_buffers(0), _net_with_buffers(1)
    m = float(momentum)
    before_t = {k: v.clone() for k, v in target.state_dict().items()}
    before_o = {k: v.clone() for k, v in online.state_dict().items()}
    update_momentum(online, target, momentum)
    after = target.state_dict()
    for key, value in after.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, m * before_t[key] + (1 - m) * before_o[key], rtol=1e-6, atol=1e-6,
                                       msg=key)
        else:  # BatchNorm's num_batches_tracked is copied
            assert torch.equal(value, before_o[key]), key
    assert all(torch.equal(v, before_o[k]) for k, v in online.state_dict().items())  # online untouched


def test_update_momentum_mismatch_raises():
    with pytest.raises(ValueError, match="differ"):
        update_momentum(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), 0.9)


@pytest.mark.parametrize("training", [True, False])
def test_momentum_copy_is_frozen_deep_copy(training):
    online = _net_with_buffers(0).train(training)
    target = momentum_copy(online)
    assert target.training == training and all(m.training == training for m in target.modules())
    for (name, p), q in zip(online.named_parameters(), target.parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), name
        assert p.requires_grad and not q.requires_grad
    for b, c in zip(online.buffers(), target.buffers()):
        assert torch.equal(b, c) and b.data_ptr() != c.data_ptr()
    target(torch.randn(5, 3)).sum()  # runs; nothing to backpropagate into
    with torch.no_grad():
        next(online.parameters()).add_(1.0)
    assert not torch.equal(next(online.parameters()), next(target.parameters()))


# ---- heads -------------------------------------------------------------------------------------------


def _structure(head: MLPHead) -> list[tuple]:
    out = []
    for m in head.net:
        if isinstance(m, nn.Linear):
            out.append(("linear", m.in_features, m.out_features, m.bias is not None))
        elif isinstance(m, nn.BatchNorm1d):
            out.append(("bn", m.num_features, m.affine))
        elif isinstance(m, nn.ReLU):
            out.append(("relu",))
        else:
            out.append((type(m).__name__,))
    return out


def test_mlp_head_layer_structure():
    assert _structure(MLPHead(6, 8, 4)) == [("linear", 6, 8, False), ("bn", 8, True), ("relu",),
                                            ("linear", 8, 4, True)]
    assert _structure(MLPHead(6, 8, 4, num_layers=3, last_norm=True)) == [
        ("linear", 6, 8, False), ("bn", 8, True), ("relu",), ("linear", 8, 8, False), ("bn", 8, True), ("relu",),
        ("linear", 8, 4, True), ("bn", 4, False)]
    assert _structure(MLPHead(6, 8, 4, norm_layer=None)) == [("linear", 6, 8, True), ("relu",),
                                                             ("linear", 8, 4, True)]
    assert _structure(MLPHead(6, 8, 4, num_layers=1)) == [("linear", 6, 4, True)]
    head = MLPHead(6, 8, 4, norm_layer=nn.LayerNorm)
    assert isinstance(head.net[1], nn.LayerNorm) and head.net[0].bias is None
    assert (head.in_dim, head.out_dim) == (6, 4)
    assert head(torch.randn(5, 6)).shape == (5, 4)


def test_mlp_head_forward_is_the_composition():
    torch.manual_seed(0)
    head = MLPHead(3, 5, 2, norm_layer=None).eval()
    x = torch.randn(4, 3)
    l1, l2 = head.net[0], head.net[2]
    expected = torch.relu(x @ l1.weight.T + l1.bias) @ l2.weight.T + l2.bias
    torch.testing.assert_close(head(x), expected)


@pytest.mark.parametrize("kwargs,match", [({"in_dim": 0}, "in_dim"), ({"hidden_dim": 2.0}, "hidden_dim"),
                                          ({"out_dim": True}, "out_dim"), ({"num_layers": 0}, "num_layers")])
def test_mlp_head_validation(kwargs, match):
    args = {"in_dim": 4, "hidden_dim": 8, "out_dim": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        MLPHead(**args)


# ---- views -------------------------------------------------------------------------------------------


def test_ssl_augmentation_shapes_and_range():
    torch.manual_seed(0)
    images = torch.rand(4, 3, 20, 24)
    out = ssl_augmentation(16, blur=0.5, solarize=0.2)(images)
    assert out.shape == (4, 3, 16, 16) and out.min() >= 0 and out.max() <= 1
    assert ssl_augmentation((8, 12))(images).shape == (4, 3, 8, 12)
    assert ssl_augmentation(8, color=0.0)(images).shape == (4, 3, 8, 8)
    gray = ssl_augmentation(8)(torch.rand(2, 1, 12, 12))  # colour operations are skipped
    assert gray.shape == (2, 1, 8, 8)


def test_ssl_augmentation_draws_per_image():
    torch.manual_seed(0)
    image = torch.rand(1, 3, 16, 16)
    out = ssl_augmentation(16)(image.expand(4, -1, -1, -1).contiguous())
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[2], out[3])


def test_two_views_differ_and_keep_shape():
    torch.manual_seed(0)
    images = torch.rand(3, 3, 16, 16)
    v1, v2 = TwoViews(ssl_augmentation(12))(images)
    assert v1.shape == v2.shape == (3, 3, 12, 12)
    assert (v1 - v2).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every image's two views differ
    second = ssl_augmentation(8)
    a, b = TwoViews(ssl_augmentation(12), second)(images)
    assert a.shape == (3, 3, 12, 12) and b.shape == (3, 3, 8, 8)


def test_multicrop_shapes():
    torch.manual_seed(0)
    crops = MultiCrop(16, 8, num_global=2, num_local=3)(torch.rand(2, 3, 20, 20))
    assert [tuple(c.shape) for c in crops] == [(2, 3, 16, 16)] * 2 + [(2, 3, 8, 8)] * 3
    assert len(MultiCrop(16, 8, num_local=0)(torch.rand(2, 3, 20, 20))) == 2
    with pytest.raises(ValueError, match="num_global"):
        MultiCrop(16, 8, num_global=0)
    with pytest.raises(ValueError, match="num_local"):
        MultiCrop(16, 8, num_local=-1)


@pytest.mark.parametrize("size,match", [(0, "size"), ((8, 8, 8), "size"), ((8, 2.5), "size")])
def test_ssl_augmentation_validation(size, match):
    with pytest.raises(ValueError, match=match):
        ssl_augmentation(size)
    with pytest.raises(ValueError, match="scale"):
        ssl_augmentation(8, scale=(0.5, 0.2))


@pytest.mark.parametrize("signature", [Signature(), Signature(in_channels=1), Signature(mean=(0.5,) * 3,
                                                                                        std=(0.5,) * 3)])
def test_denormalize_inverts_signature_normalize(signature):
    torch.manual_seed(0)
    pixels = torch.rand(2, signature.in_channels, 5, 6, dtype=torch.float64)
    normalised = signature.normalize(pixels)
    mean = torch.tensor(signature.mean, dtype=torch.float64).view(-1, 1, 1)
    std = torch.tensor(signature.std, dtype=torch.float64).view(-1, 1, 1)
    torch.testing.assert_close(normalised, (pixels - mean) / std)
    back = denormalize(normalised, signature.mean, signature.std)
    assert back.dtype == torch.float64
    torch.testing.assert_close(back, pixels, rtol=0, atol=1e-12)
