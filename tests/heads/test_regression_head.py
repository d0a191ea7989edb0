"""cvzoo.heads.regression: bounded values and keypoints against their closed forms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cvzoo.heads import KeypointOutput, KeypointRegressionHead, RegressionHead, RegressionOutput


def _feats(scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 4, 9, 11, generator=g), scale * torch.randn(2, 6, 5, 7, generator=g)]


def test_unbounded_regression_equals_pool_plus_linear():
    torch.manual_seed(0)
    head = RegressionHead(6, 3).eval()
    out = head(_feats())
    assert isinstance(out, RegressionOutput)
    assert out.values.shape == (2, 3)
    linear = head.mlp[-1]
    torch.testing.assert_close(out.values, F.linear(_feats()[-1].mean(dim=(2, 3)), linear.weight, linear.bias))


@pytest.mark.parametrize("value_range", [(0.0, 1.0), (-3.7, 1.1), (10.0, 250.0)])
def test_bounded_regression_equals_scaled_sigmoid(value_range):
    torch.manual_seed(0)
    low, high = value_range
    head = RegressionHead(6, 2, value_range=value_range, hidden=5).eval()
    fc1, fc2 = head.mlp[0], head.mlp[-1]
    z = F.linear(F.relu(F.linear(_feats()[-1].mean(dim=(2, 3)), fc1.weight, fc1.bias)), fc2.weight, fc2.bias)
    torch.testing.assert_close(head(_feats()).values, low + (high - low) * torch.sigmoid(z))


@pytest.mark.parametrize("value_range", [(0.0, 1.0), (-3.7, 1.1), (10.0, 250.0), (-1e-3, 1e-3)])
@pytest.mark.parametrize("scale", [1e4, -1e4, 1e30])
def test_bounded_regression_stays_in_range_for_extreme_inputs(value_range, scale):
    torch.manual_seed(0)
    low, high = value_range
    head = RegressionHead(6, 4, value_range=value_range).eval()
    values = head(_feats(scale)).values
    assert torch.isfinite(values).all()
    lo = torch.tensor(low, dtype=values.dtype)  # the bounds as the output dtype represents them
    hi = torch.tensor(high, dtype=values.dtype)
    assert bool((values >= lo).all()), f"min {values.min().item()!r} < low {lo.item()!r}"
    assert bool((values <= hi).all()), f"max {values.max().item()!r} > high {hi.item()!r}"


def test_keypoint_head_shape_range_and_closed_form():
    torch.manual_seed(0)
    head = KeypointRegressionHead(6, 4, hidden=8).eval()
    out = head(_feats())
    assert isinstance(out, KeypointOutput)
    assert out.points.shape == (2, 4, 2)
    assert bool((out.points >= 0).all()) and bool((out.points <= 1).all())
    fc1, fc2 = head.mlp[0], head.mlp[-1]
    z = F.linear(F.relu(F.linear(_feats()[-1].mean(dim=(2, 3)), fc1.weight, fc1.bias)), fc2.weight, fc2.bias)
    # output row k is (x_k, y_k) = sigmoid(z[2k]), sigmoid(z[2k + 1])
    for k in range(4):
        torch.testing.assert_close(out.points[:, k, 0], torch.sigmoid(z[:, 2 * k]))
        torch.testing.assert_close(out.points[:, k, 1], torch.sigmoid(z[:, 2 * k + 1]))


def test_keypoint_head_extreme_inputs_stay_in_unit_square():
    torch.manual_seed(0)
    head = KeypointRegressionHead(6, 3, hidden=0).eval()
    for scale in (1e6, -1e6):
        pts = head(_feats(scale)).points
        assert torch.isfinite(pts).all()
        assert bool((pts >= 0).all()) and bool((pts <= 1).all())


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        (dict(value_range=(1.0, 0.0)), "value_range"),
        (dict(value_range=(1.0, 1.0)), "value_range"),
        (dict(value_range=(0.0, 1.0, 2.0)), "value_range"),
        (dict(in_channels=0), "in_channels"),
        (dict(num_outputs=0), "num_outputs"),
        (dict(hidden=-1), "hidden"),
        (dict(dropout=1.0), "dropout"),
        (dict(pool="sum"), "pool"),
    ],
)
def test_regression_head_rejects_bad_args(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        RegressionHead(**{"in_channels": 6, **kwargs})


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        (dict(num_keypoints=0), "num_keypoints"),
        (dict(in_channels=0), "in_channels"),
        (dict(hidden=-2), "hidden"),
        (dict(dropout=1.5), "dropout"),
        (dict(pool="sum"), "pool"),
    ],
)
def test_keypoint_head_rejects_bad_args(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        KeypointRegressionHead(**{"in_channels": 6, "num_keypoints": 4, **kwargs})
