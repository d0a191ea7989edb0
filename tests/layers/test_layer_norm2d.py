"""cvzoo.layers.norm.LayerNorm2d against F.layer_norm over channels and the closed form."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cvzoo.layers import LayerNorm2d


def _norm(channels: int = 5) -> LayerNorm2d:
    torch.manual_seed(0)
    norm = LayerNorm2d(channels, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    return norm


def _reference(norm: LayerNorm2d, x: torch.Tensor) -> torch.Tensor:
    y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), norm.weight, norm.bias, norm.eps)
    return y.permute(0, 3, 1, 2)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_layer_norm2d_equals_layer_norm_over_channels(channels_last):
    norm = _norm()
    x = torch.randn(2, 5, 7, 9) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = norm(x)
    assert out.shape == (2, 5, 7, 9)
    torch.testing.assert_close(out, _reference(norm, x.contiguous()), rtol=1e-5, atol=1e-5)


def test_layer_norm2d_closed_form():
    norm = _norm()
    x = torch.randn(2, 5, 4, 6) * 2 - 0.5
    mean = x.mean(dim=1, keepdim=True)
    var = x.var(dim=1, unbiased=False, keepdim=True)
    ref = (x - mean) / torch.sqrt(var + norm.eps) * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(norm(x), ref, rtol=1e-5, atol=1e-5)


def test_layer_norm2d_normalises_channels_not_space():
    norm = LayerNorm2d(3)
    x = torch.randn(2, 3, 4, 4) * 5 + 2
    out = norm(x)
    torch.testing.assert_close(out.mean(dim=1), torch.zeros(2, 4, 4), rtol=0, atol=1e-5)
    assert not torch.allclose(out.mean(dim=(2, 3)), torch.zeros(2, 3), atol=1e-3)


def test_layer_norm2d_backward():
    norm = _norm()
    x = torch.randn(2, 5, 3, 3, requires_grad=True)
    (norm(x) * torch.randn(2, 5, 3, 3)).sum().backward()
    assert x.grad is not None and norm.weight.grad is not None and norm.bias.grad is not None
