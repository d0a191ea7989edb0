"""cvzoo.layers.init: prior-probability bias (closed form) and the conv initialisers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cvzoo.layers import init_conv_kaiming_uniform_, init_conv_normal_, prior_probability_bias


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5, 0.9, 1e-6])
def test_prior_probability_bias_inverts_sigmoid(p):
    b = prior_probability_bias(p)
    assert isinstance(b, float)
    assert math.isclose(1.0 / (1.0 + math.exp(-b)), p, rel_tol=1e-9)
    assert math.isclose(torch.sigmoid(torch.tensor(b, dtype=torch.float64)).item(), p, rel_tol=1e-9)


def test_prior_probability_bias_retinanet_value():
    assert math.isclose(prior_probability_bias(0.01), -math.log(99.0), rel_tol=1e-12)
    assert prior_probability_bias(0.5) == 0.0


@pytest.mark.parametrize("p", [0.0, 1.0, -0.1, 1.5, float("nan"), float("inf")])
def test_prior_probability_bias_rejects_invalid(p):
    with pytest.raises(ValueError, match="prior_prob"):
        prior_probability_bias(p)


def test_init_conv_normal():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(64, 64, 3), nn.Linear(4, 4), nn.Sequential(nn.Conv2d(64, 32, 1, bias=False)))
    linear_before = m[1].weight.clone()
    init_conv_normal_(m, std=0.02, bias=-4.6)
    w = m[0].weight
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    assert torch.equal(m[0].bias, torch.full((64,), -4.6))
    assert abs(m[2][0].weight.std().item() - 0.02) < 0.003
    assert torch.equal(m[1].weight, linear_before)  # only convs


def test_init_conv_kaiming_uniform_bounds():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(16, 32, 3), nn.Conv2d(32, 8, 1))
    with torch.no_grad():
        for c in m:
            c.bias.fill_(1.0)
    init_conv_kaiming_uniform_(m)
    for c in m:
        bound = math.sqrt(3.0 / c.weight[0].numel())  # kaiming_uniform_(a=1): gain 1
        assert c.weight.abs().max() <= bound + 1e-6
        assert c.weight.abs().max() > 0.9 * bound
        assert torch.count_nonzero(c.bias) == 0
