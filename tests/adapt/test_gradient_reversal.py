import math

import pytest
import torch

from cvzoo.adapt import GradientReversal, dann_coefficient, reverse_gradient

pytestmark = pytest.mark.usefixtures("one_thread")


def test_forward_is_identity_and_backward_flips_and_scales_exactly():
    x = torch.randn(4, 3, requires_grad=True)
    upstream = torch.randn(4, 3)
    y = reverse_gradient(x, 0.3)
    assert torch.equal(y, x)
    (grad,) = torch.autograd.grad(y, x, upstream)
    assert torch.equal(grad, -0.3 * upstream)


def test_zero_coefficient_blocks_the_gradient_but_not_the_value():
    x = torch.randn(5, requires_grad=True)
    (grad,) = torch.autograd.grad((reverse_gradient(x, 0.0) * 2).sum(), x)
    assert torch.equal(grad, torch.zeros(5))


def test_dann_schedule_matches_the_closed_form_and_is_clamped():
    for p in (0.0, 0.1, 0.5, 1.0):
        assert float(dann_coefficient(p)) == pytest.approx(2 / (1 + math.exp(-10 * p)) - 1, abs=1e-6)
    assert float(dann_coefficient(2.0)) == pytest.approx(float(dann_coefficient(1.0)))
    assert float(dann_coefficient(-1.0)) == 0.0


def test_scheduled_layer_counts_training_calls_only():
    layer = GradientReversal(2.0, schedule_steps=10)
    x = torch.ones(3, requires_grad=True)
    coefficients = []
    for _ in range(4):
        coefficients.append(float(layer.current_coefficient()))
        layer(x)
    assert int(layer.step) == 4
    assert coefficients == pytest.approx([2.0 * float(dann_coefficient(i / 10)) for i in range(4)])
    layer.eval()
    layer(x)
    assert int(layer.step) == 4
    # the gradient of the 5th training call uses the coefficient at step 4
    layer.train()
    (grad,) = torch.autograd.grad(layer(x).sum(), x)
    assert torch.allclose(grad, torch.full((3,), -2.0 * float(dann_coefficient(0.4))))
    assert "step" in layer.state_dict()


def test_compiles_with_fullgraph_and_gives_the_same_gradient():
    layer = GradientReversal(0.7, schedule_steps=5)
    layer.step.fill_(3)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    x = torch.randn(2, 4, requires_grad=True)
    (grad,) = torch.autograd.grad(compiled(x).square().sum(), x)
    expected = -0.7 * float(dann_coefficient(0.6)) * 2 * x.detach()
    assert float(dann_coefficient(0.6)) > 0.9
    assert torch.allclose(grad, expected)
    assert int(layer.step) == 4


@pytest.mark.parametrize("kwargs, match", [({"coefficient": -1.0}, "coefficient"),
                                           ({"coefficient": float("nan")}, "coefficient"),
                                           ({"schedule_steps": 0}, "schedule_steps"),
                                           ({"gamma": 0.0}, "gamma")])
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientReversal(**kwargs)
