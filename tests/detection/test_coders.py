"""cvzoo.detection.coders against torchvision's det_utils coders and closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder as TVBoxCoder
from torchvision.models.detection._utils import BoxLinearCoder

from cvzoo.detection.coders import DEFAULT_EXP_CLAMP, BoxCoder, DistanceCoder, centerness
from cvzoo.detection.priors import PointGenerator


def _boxes(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(*shape, 2, generator=g) * 80
    wh = 2.0 + torch.rand(*shape, 2, generator=g) * 60
    return torch.cat([xy, xy + wh], dim=-1)


WEIGHTS = [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]


@pytest.mark.parametrize("weights", WEIGHTS)
def test_box_coder_encode_equals_torchvision(weights):
    boxes, priors = _boxes(2, 7, seed=1), _boxes(2, 7, seed=2)
    out = BoxCoder(weights).encode(boxes, priors)
    assert out.shape == (2, 7, 4)
    tv = TVBoxCoder(weights)
    expected = torch.stack([tv.encode_single(boxes[i], priors[i]) for i in range(2)])
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_box_coder_decode_equals_torchvision(weights):
    g = torch.Generator().manual_seed(3)
    deltas = torch.randn(2, 7, 4, generator=g) * 2
    deltas[0, 0, 2:] = 100.0  # beyond the exp clamp: both must clamp the same way
    priors = _boxes(2, 7, seed=4)
    out = BoxCoder(weights).decode(deltas, priors)
    tv = TVBoxCoder(weights)
    expected = torch.stack([tv.decode_single(deltas[i], priors[i]) for i in range(2)])
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_box_coder_round_trip(weights):
    coder = BoxCoder(weights)
    boxes, priors = _boxes(3, 11, seed=5), _boxes(3, 11, seed=6)
    torch.testing.assert_close(coder.decode(coder.encode(boxes, priors), priors), boxes, atol=1e-4, rtol=1e-5)


def test_box_coder_decode_clamps_log_size():
    coder = BoxCoder(exp_clamp=1.0)
    prior = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    out = coder.decode(torch.tensor([[0.0, 0.0, 5.0, 0.5]]), prior)
    w, h = 10 * math.e, 20 * math.exp(0.5)  # dw clamped at 1, dh not
    torch.testing.assert_close(out, torch.tensor([[5 - w / 2, 10 - h / 2, 5 + w / 2, 10 + h / 2]]))
    default = BoxCoder().decode(torch.tensor([[0.0, 0.0, 50.0, 50.0]]), prior)
    assert torch.isfinite(default).all()
    torch.testing.assert_close(default[0, 2] - default[0, 0], torch.tensor(10 * 1000.0 / 16))
    assert math.isclose(DEFAULT_EXP_CLAMP, math.log(1000.0 / 16))


def test_box_coder_rejects_bad_weights():
    with pytest.raises(ValueError, match="weights"):
        BoxCoder((1.0, 1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="weights"):
        BoxCoder((1.0, 1.0, 1.0))


def _points_and_square_anchors():
    sizes, strides = [(4, 5), (2, 3)], (8, 16)
    points, point_strides = PointGenerator(strides, offset=0.0)(sizes)
    half = point_strides[:, None] / 2
    anchors = torch.cat([points - half, points + half], dim=-1)  # squares of side = stride, centred at the points
    return points, point_strides, anchors


def test_distance_coder_equals_torchvision_box_linear_coder():
    points, strides, anchors = _points_and_square_anchors()
    r = points.shape[0]
    boxes = _boxes(2, r, seed=7)
    ours = DistanceCoder(normalize=True)
    tv = BoxLinearCoder(normalize_by_size=True)
    enc = ours.encode(boxes, points, strides)
    torch.testing.assert_close(enc, torch.stack([tv.encode(anchors, boxes[i]) for i in range(2)]))
    g = torch.Generator().manual_seed(8)
    codes = torch.rand(2, r, 4, generator=g) * 5
    torch.testing.assert_close(ours.decode(codes, points, strides),
                               torch.stack([tv.decode(codes[i], anchors) for i in range(2)]))


@pytest.mark.parametrize("normalize", [True, False])
def test_distance_coder_round_trip(normalize):
    points, strides, _ = _points_and_square_anchors()
    boxes = _boxes(3, points.shape[0], seed=9)
    coder = DistanceCoder(normalize=normalize)
    enc = coder.encode(boxes, points, strides)
    torch.testing.assert_close(coder.decode(enc, points, strides), boxes, atol=1e-4, rtol=1e-5)
    if not normalize:  # raw distances, closed form
        x, y = points[:, 0], points[:, 1]
        torch.testing.assert_close(enc[..., 0], x - boxes[..., 0])
        torch.testing.assert_close(enc[..., 3], boxes[..., 3] - y)


def test_centerness_closed_form():
    g = torch.Generator().manual_seed(10)
    ltrb = torch.rand(3, 5, 4, generator=g) * 10 + 0.1
    out = centerness(ltrb)
    assert out.shape == (3, 5)
    for idx in torch.cartesian_prod(torch.arange(3), torch.arange(5)).tolist():
        left, top, right, bottom = ltrb[idx[0], idx[1]].tolist()
        expected = math.sqrt(min(left, right) / max(left, right) * min(top, bottom) / max(top, bottom))
        assert math.isclose(out[idx[0], idx[1]].item(), expected, rel_tol=1e-5)
    torch.testing.assert_close(centerness(torch.tensor([2.0, 3.0, 2.0, 3.0])), torch.tensor(1.0))
