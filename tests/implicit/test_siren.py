"""SIREN: the paper's initialisation bounds, and its distribution claims checked statistically against closed forms."""

import math

import pytest
import torch

from cvzoo.implicit import SIREN, SineLayer, siren_weight_bound

pytestmark = pytest.mark.usefixtures("one_thread")


def _normal_cdf(x: torch.Tensor, var: float) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2 * var)))


def _ks(samples: torch.Tensor, cdf) -> float:
    """Kolmogorov-Smirnov distance between the samples' empirical CDF and `cdf`."""
    x = samples.flatten().double().sort().values
    n = x.numel()
    f = cdf(x)
    hi = torch.arange(1, n + 1, dtype=torch.float64) / n
    lo = torch.arange(0, n, dtype=torch.float64) / n
    return float(torch.maximum(hi - f, f - lo).max())


def _arcsine_cdf(y: torch.Tensor) -> torch.Tensor:
    return 0.5 + torch.asin(y.clamp(-1, 1)) / math.pi


def _activations(model: SIREN, n: int = 2048):
    """[(pre-activation, sine output)] of each sine layer on inputs uniform in [-1, 1]^2."""
    h = torch.rand(n, model.in_features) * 2 - 1
    out = []
    with torch.no_grad():
        for layer in model.net:
            if not isinstance(layer, SineLayer):
                break
            z = layer.preactivation(h)
            h = torch.sin(z)
            out.append((z, h))
    return out


def test_weight_bounds_and_variance_follow_the_paper():
    model = SIREN(in_features=2, hidden_features=256, hidden_layers=3, out_features=3)
    first, hidden, final = model.net[0].linear, model.net[1].linear, model.net[-1]
    for weight, bound in ((first.weight, 1 / 2), (hidden.weight, math.sqrt(6 / 256) / 30),
                          (final.weight, math.sqrt(6 / 256) / 30)):
        assert weight.abs().max() <= bound
        assert weight.abs().max() > 0.95 * bound  # filled up to the bound, not narrower
        # U(-c, c) has variance c^2 / 3
        assert weight.var().item() == pytest.approx(bound ** 2 / 3, rel=0.1 if weight.numel() < 1000 else 0.03)
    assert siren_weight_bound(2, 30.0, True) == 0.5
    assert siren_weight_bound(256, 30.0, False) == pytest.approx(math.sqrt(6 / 256) / 30)
    assert model.net[0].omega_0 == 30.0 and model.net[1].omega_0 == 30.0
    assert isinstance(final, torch.nn.Linear) and not isinstance(SIREN(outermost_linear=False).net[-1],
                                                                  torch.nn.Linear)


def test_first_layer_sines_are_arcsine_distributed():
    (z0, y0), *_ = _activations(SIREN(2, 256, 3, 3))
    assert z0.std() > 2 * math.pi  # omega_0 = 30 spreads the first layer over several periods
    assert y0.var().item() == pytest.approx(0.5, abs=0.01)
    assert abs(y0.mean().item()) < 0.02
    assert _ks(y0, _arcsine_cdf) < 0.02
    assert _ks(y0, lambda x: (x + 1) / 2) > 0.1  # far from uniform: the test can tell distributions apart


def test_second_layer_preactivations_are_standard_normal():
    """The paper's central claim: omega_0 * (W x + b) of a hidden layer is N(0, 1) for the init above."""
    _, (z1, _), *_ = _activations(SIREN(2, 256, 3, 3))
    assert abs(z1.mean().item()) < 0.05
    assert z1.var().item() == pytest.approx(1.0, abs=0.06)
    kurtosis = ((z1 - z1.mean()) ** 4).mean() / z1.var() ** 2
    assert kurtosis.item() == pytest.approx(3.0, abs=0.15)  # normal, not uniform (1.8) or heavy-tailed
    assert _ks(z1, lambda x: _normal_cdf(x, 1.0)) < 0.02


def test_deeper_layers_follow_the_closed_form_for_sines_of_gaussians():
    """For z ~ N(0, v), Var(sin z) = (1 - exp(-2 v)) / 2 (so 0.43, not the arcsine's 1/2, at v = 1), and the
    next pre-activation has variance in * (2 / in) * Var(sin z) = 1 - exp(-2 v): the variance settles near 0.8."""
    acts = _activations(SIREN(2, 256, 5, 3))
    for (z, y), (z_next, _) in zip(acts[1:], acts[2:]):
        v = z.var().item()
        assert y.var().item() == pytest.approx((1 - math.exp(-2 * v)) / 2, rel=0.03)
        assert z_next.var().item() == pytest.approx(1 - math.exp(-2 * v), rel=0.08)
        w = z_next.var().item()
        assert _ks(z_next, lambda x, w=w: _normal_cdf(x, w)) < 0.02
    assert 0.7 < acts[-1][0].var().item() < 0.95


def test_torch_default_bias_breaks_the_normal_claim_as_documented():
    """The official code's nn.Linear bias U(-1/sqrt(in), 1/sqrt(in)), times omega_0, adds omega_0^2 / (3 in)."""
    _, (z1, _), *_ = _activations(SIREN(2, 256, 3, 3, bias_init="torch"), n=4096)
    assert z1.var().item() == pytest.approx(1 + 900 / (3 * 256), rel=0.15)


def test_forward_shapes_and_validation():
    model = SIREN(in_features=3, hidden_features=16, hidden_layers=0, out_features=4)
    assert model(torch.rand(5, 7, 3)).shape == (5, 7, 4)
    assert len(model.net) == 2
    with pytest.raises(ValueError, match=r"hidden_layers must be an int >= 0, got -1"):
        SIREN(hidden_layers=-1)
    with pytest.raises(ValueError, match=r"hidden_features must be an int >= 1, got 0"):
        SIREN(hidden_features=0)
    with pytest.raises(ValueError, match=r"omega_0 must be a positive finite number, got -30"):
        SineLayer(2, 4, omega_0=-30)
    with pytest.raises(ValueError, match=r"coords must have shape \(\.\.\., 3\), got \(5, 2\)"):
        model(torch.rand(5, 2))
    with pytest.raises(ValueError, match="bias_init"):
        SIREN(bias_init="zeros")
