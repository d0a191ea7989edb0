"""PositionalEncoding against a hand computation and nerf-pytorch's embedder; FourierFeatures against its kernel."""

import math

import pytest
import torch

from cvzoo.implicit import CoordinateMLP, FourierFeatures, PositionalEncoding

pytestmark = pytest.mark.usefixtures("one_thread")


def _nerf_pytorch_embed(x: torch.Tensor, multires: int, log_sampling: bool = True) -> torch.Tensor:
    """nerf-pytorch's `Embedder` (include_input, periodic_fns = sin, cos; no pi), re-typed as the reference."""
    max_freq = multires - 1
    bands = 2.0 ** torch.linspace(0.0, max_freq, steps=multires) if log_sampling \
        else torch.linspace(2.0 ** 0.0, 2.0 ** max_freq, steps=multires)
    fns = [lambda v: v]
    for freq in bands:
        for p_fn in (torch.sin, torch.cos):
            fns.append(lambda v, p_fn=p_fn, freq=freq: p_fn(v * freq))
    return torch.cat([fn(x) for fn in fns], -1)


def test_positional_encoding_by_hand():
    x = torch.tensor([[0.25, -0.5, 1.0]])
    enc = PositionalEncoding(2, in_features=3)
    assert enc.out_features == 3 * (1 + 2 * 2) == enc(x).shape[-1]
    s2, pi = math.sqrt(2) / 2, math.pi
    expected = [0.25, -0.5, 1.0,
                s2, -1.0, 0.0,  # sin(pi x)
                s2, 0.0, -1.0,  # cos(pi x)
                1.0, 0.0, 0.0,  # sin(2 pi x)
                0.0, -1.0, 1.0]  # cos(2 pi x)
    torch.testing.assert_close(enc(x)[0], torch.tensor(expected), atol=1e-6, rtol=0)
    torch.testing.assert_close(enc.frequencies, torch.tensor([pi, 2 * pi]))
    no_input = PositionalEncoding(2, in_features=3, include_input=False)
    torch.testing.assert_close(no_input(x)[0], torch.tensor(expected[3:]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("log_sampling", [True, False])
def test_positional_encoding_matches_nerf_pytorch_without_pi(log_sampling):
    x = torch.randn(4, 5, 3)
    enc = PositionalEncoding(6, in_features=3, log_sampling=log_sampling, include_pi=False)
    torch.testing.assert_close(enc(x), _nerf_pytorch_embed(x, 6, log_sampling))
    assert enc(x).shape == (4, 5, 39)
    assert "frequencies" not in enc.state_dict()  # derived: a non-persistent buffer


def test_fourier_features_closed_form_and_kernel():
    ff = FourierFeatures(2, mapping_size=4, scale=3.0)
    x = torch.rand(6, 2)
    proj = 2 * math.pi * x @ ff.B.T
    torch.testing.assert_close(ff(x), torch.cat([torch.cos(proj), torch.sin(proj)], dim=-1))
    assert "B" in ff.state_dict() and not list(ff.parameters())  # random: a persistent buffer
    assert isinstance(FourierFeatures(2, 4, learnable=True).B, torch.nn.Parameter)
    assert FourierFeatures(3, 8, include_input=True)(torch.rand(2, 3)).shape == (2, 19)

    # gamma(x) . gamma(y) = sum_k cos(2 pi b_k . (x - y)): shift invariant, and with b ~ N(0, s^2 I) its mean
    # over features is the Gaussian kernel exp(-2 pi^2 s^2 |x - y|^2)
    scale, m = 2.0, 20000
    ff = FourierFeatures(2, mapping_size=m, scale=scale, generator=torch.Generator().manual_seed(0))
    assert ff.B.std().item() == pytest.approx(scale, rel=0.02)
    a, b = torch.tensor([[0.1, -0.2]]), torch.tensor([[0.15, -0.1]])
    shift = torch.tensor([[0.37, 0.61]])
    k_ab = (ff(a) * ff(b)).sum() / m
    torch.testing.assert_close(k_ab, (ff(a + shift) * ff(b + shift)).sum() / m, atol=1e-3, rtol=0)
    expected = math.exp(-2 * math.pi ** 2 * scale ** 2 * ((a - b) ** 2).sum().item())
    assert k_ab.item() == pytest.approx(expected, abs=0.02)


def test_coordinate_mlp_with_and_without_encoding():
    plain = CoordinateMLP(2, 32, 2, 3)
    assert plain(torch.rand(10, 2)).shape == (10, 3)
    assert sum(isinstance(m, torch.nn.Linear) for m in plain.net) == 4  # in, 2 hidden, out
    encoded = CoordinateMLP(2, 32, 1, 3, encoding=PositionalEncoding(4, in_features=2))
    assert encoded.net[0].in_features == 2 * (1 + 8)
    assert encoded(torch.rand(7, 2)).shape == (7, 3)
    with pytest.raises(ValueError, match="encoding takes 3 features but in_features=2"):
        CoordinateMLP(2, encoding=PositionalEncoding(4, in_features=3))


def test_validation_names_argument_and_value():
    with pytest.raises(ValueError, match=r"num_frequencies must be an int >= 0, got -1"):
        PositionalEncoding(-1)
    with pytest.raises(ValueError, match=r"scale must be a positive finite number, got 0"):
        FourierFeatures(2, 8, scale=0)
    with pytest.raises(ValueError, match=r"mapping_size must be an int >= 1, got 0"):
        FourierFeatures(2, 0)
    with pytest.raises(ValueError, match=r"x must be a tensor of shape \(\.\.\., 3\), got \(4, 2\)"):
        PositionalEncoding(2)(torch.rand(4, 2))
    with pytest.raises(ValueError, match=r"coords must be a tensor of shape \(\.\.\., 2\), got \(4, 3\)"):
        CoordinateMLP()(torch.rand(4, 3))
