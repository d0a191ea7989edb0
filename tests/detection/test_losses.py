"""cvzoo.detection.losses against torchvision.ops, torch.nn.functional and closed forms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from cvzoo.detection import losses as losses_module
from cvzoo.detection.losses import (
    centerness_loss,
    focal_loss,
    gaussian_focal_loss,
    giou_loss,
    l1_loss,
    smooth_l1_loss,
)

NAN, INF = float("nan"), float("inf")


def _boxes(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(*shape, 2, generator=g) * 50
    wh = 1.0 + torch.rand(*shape, 2, generator=g) * 40
    return torch.cat([xy, xy + wh], dim=-1)


def _weight(b: int, r: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(b, r, generator=g) > 0.4).float() * (0.5 + torch.rand(b, r, generator=g))
    w[1] = 0.0  # an image with no foreground at all
    return w


@pytest.mark.parametrize(("alpha", "gamma"), [(0.25, 2.0), (-1.0, 0.0), (0.5, 1.5)])
def test_focal_loss_equals_torchvision_summed(alpha, gamma):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 5, generator=g) * 3
    targets = (torch.rand(2, 6, 5, generator=g) > 0.7).float()
    out = focal_loss(logits, targets, alpha=alpha, gamma=gamma)
    assert out.shape == (2, 6)
    expected = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none").sum(-1)
    torch.testing.assert_close(out, expected)
    weight = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0, 1.0], [0.0] * 6])
    torch.testing.assert_close(focal_loss(logits, targets, weight, alpha=alpha, gamma=gamma), expected * weight)


def test_giou_loss_equals_torchvision_on_masked_rows():
    pred, target = _boxes(3, 8, seed=2), _boxes(3, 8, seed=3)
    weight = _weight(3, 8, seed=4)
    out = giou_loss(pred, target, weight)
    assert out.shape == (3, 8)
    keep = weight > 0
    expected = generalized_box_iou_loss(pred[keep], target[keep], reduction="none") * weight[keep]
    torch.testing.assert_close(out[keep], expected)
    assert torch.equal(out[~keep], torch.zeros(int((~keep).sum())))
    assert (out[keep] > 0).all()


def test_giou_loss_masked_rows_are_zero_with_finite_gradients_even_if_degenerate():
    pred, target = _boxes(2, 4, seed=5), _boxes(2, 4, seed=6)
    weight = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    target[0, 1] = torch.tensor([3.0, 3.0, 3.0, 3.0])  # zero-area target and pred: 0 / 0 in GIoU
    pred[0, 1] = torch.tensor([3.0, 3.0, 3.0, 3.0])
    target[0, 3] = torch.tensor([NAN, 0.0, INF, 1.0])
    pred[1, 0] = torch.tensor([INF, -INF, NAN, 2.0])
    pred.requires_grad_(True)
    out = giou_loss(pred, target, weight)
    assert torch.equal(out[weight == 0], torch.zeros(6))
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(pred.grad).all()
    assert torch.equal(pred.grad[weight == 0], torch.zeros(6, 4))
    assert (pred.grad[0, 0] != 0).any()


def test_l1_and_smooth_l1_masking():
    g = torch.Generator().manual_seed(7)
    pred, target = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    weight = _weight(3, 5, seed=8)
    keep = weight > 0
    torch.testing.assert_close(l1_loss(pred, target, weight), (pred - target).abs().sum(-1) * weight)
    beta = 0.3
    ref = F.smooth_l1_loss(pred, target, beta=beta, reduction="none").sum(-1) * weight
    torch.testing.assert_close(smooth_l1_loss(pred, target, weight, beta=beta), ref)
    # closed form of smooth-L1 for one element on each branch
    one = smooth_l1_loss(torch.tensor([[[0.0, 0.0, 0.0, 2.0]]]), torch.tensor([[[0.1, 0.0, 0.0, 0.0]]]),
                         torch.ones(1, 1), beta=beta)
    torch.testing.assert_close(one, torch.tensor([[0.5 * 0.1**2 / beta + 2.0 - 0.5 * beta]]))
    # masked rows give exact zeros even with non-finite targets there
    target[~keep] = torch.tensor([NAN, INF, -INF, 1.0])
    for fn in (l1_loss, smooth_l1_loss):
        out = fn(pred, target, weight)
        assert torch.equal(out[~keep], torch.zeros(int((~keep).sum())))
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("bad", [-INF, NAN])
@pytest.mark.parametrize("fn", [l1_loss, smooth_l1_loss])
def test_l1_losses_gradients_finite_with_non_finite_targets_on_masked_rows(fn, bad):
    # BoxCoder.encode of a padding (zero) box gives log(0) = -inf on background rows; 0 / 0 gives NaN.
    # Masked rows must be inert in backward too (as giou_loss and centerness_loss guarantee), or one bad
    # background target turns the whole step's gradients into NaN.
    g = torch.Generator().manual_seed(9)
    pred = torch.randn(2, 3, 4, generator=g).requires_grad_(True)
    target = torch.randn(2, 3, 4, generator=g)
    weight = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    target[weight == 0] = torch.tensor([0.0, 0.0, bad, bad])
    fn(pred, target, weight).sum().backward()
    assert torch.isfinite(pred.grad).all()
    assert torch.equal(pred.grad[weight == 0], torch.zeros(4, 4))


def test_centerness_loss_equals_bce_on_masked_rows():
    g = torch.Generator().manual_seed(10)
    logits, target = torch.randn(3, 7, generator=g) * 2, torch.rand(3, 7, generator=g)
    weight = _weight(3, 7, seed=11)
    keep = weight > 0
    target[~keep] = NAN  # whatever sits on masked rows (0 / 0 centre-ness of background) must not leak
    logits.requires_grad_(True)
    out = centerness_loss(logits, target, weight)
    expected = F.binary_cross_entropy_with_logits(logits[keep], target[keep], reduction="none") * weight[keep]
    torch.testing.assert_close(out[keep], expected)
    assert torch.equal(out[~keep], torch.zeros(int((~keep).sum())))
    out.sum().backward()
    assert torch.isfinite(logits.grad).all() and torch.equal(logits.grad[~keep], torch.zeros(int((~keep).sum())))


def test_gaussian_focal_loss_closed_form():
    logits = torch.tensor([[[0.5, -1.0], [2.0, 0.0]], [[-3.0, 1.0], [0.0, 0.0]]])  # (B=2, R=2, K=2)
    heat = torch.tensor([[[1.0, 0.3], [0.0, 1.0]], [[0.8, 0.0], [0.0, 0.0]]])
    alpha, beta = 2.0, 4.0
    expected = []
    for b in range(2):
        total = 0.0
        for r in range(2):
            for k in range(2):
                p = 1 / (1 + math.exp(-logits[b, r, k].item()))
                y = heat[b, r, k].item()
                if y == 1.0:
                    total += -((1 - p) ** alpha) * math.log(p)
                else:
                    total += -((1 - y) ** beta) * p**alpha * math.log(1 - p)
        expected.append(total)
    out = gaussian_focal_loss(logits, heat, alpha, beta)
    assert out.shape == (2,)
    torch.testing.assert_close(out, torch.tensor(expected))


def test_gaussian_focal_loss_stays_finite_for_extreme_logits():
    logits = torch.tensor([[[200.0, -200.0]]])
    heat = torch.tensor([[[0.0, 1.0]]])
    out = gaussian_focal_loss(logits.clone().requires_grad_(True), heat)
    assert torch.isfinite(out).all() and out.item() > 100  # both confidently wrong: large but finite


def test_losses_stay_float32_under_bf16_autocast():
    g = torch.Generator().manual_seed(12)
    b, r, k = 2, 6, 3
    logits = torch.randn(b, r, k, generator=g).bfloat16()
    onehot = (torch.rand(b, r, k, generator=g) > 0.6).float()
    boxes_p, boxes_t = _boxes(b, r, seed=13).bfloat16(), _boxes(b, r, seed=14)
    weight = _weight(b, r, seed=15)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = {
            "focal": focal_loss(logits, onehot, weight),
            "giou": giou_loss(boxes_p, boxes_t, weight),
            "l1": l1_loss(boxes_p, boxes_t, weight),
            "smooth_l1": smooth_l1_loss(boxes_p, boxes_t, weight),
            "centerness": centerness_loss(logits[..., 0], onehot[..., 0], weight),
            "gaussian_focal": gaussian_focal_loss(logits, onehot * 0.5),
        }
    for name, out in outs.items():
        assert out.dtype == torch.float32, name
        assert torch.isfinite(out).all(), name
    # and they equal the float32 computation on the same (bf16-rounded) inputs
    torch.testing.assert_close(outs["focal"], focal_loss(logits.float(), onehot, weight))
    torch.testing.assert_close(outs["giou"], giou_loss(boxes_p.float(), boxes_t, weight))


@pytest.mark.parametrize("compiled", [False, True])
def test_label_focal_loss_equals_torchvision_focal_on_one_hot_targets(compiled):
    """Both formulas (eager: sigmoid + softplus; traced: one exp and one log) against torchvision."""
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(2, 50, 6, generator=g) * 4).requires_grad_(True)
    labels = torch.randint(-1, 6, (2, 50), generator=g)
    weight = (torch.rand(2, 50, generator=g) > 0.2).float()
    fn = torch.compile(losses_module.label_focal_loss, backend="eager", fullgraph=True) if compiled \
        else losses_module.label_focal_loss
    ours = fn(logits, labels, weight)
    onehot = F.one_hot(labels.clamp(min=0), 6).float() * (labels >= 0)[..., None]
    ref = sigmoid_focal_loss(logits, onehot, reduction="none").sum(-1) * weight
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    (g_ours,) = torch.autograd.grad(ours.sum(), logits)
    (g_ref,) = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.5, 1.5), (0.25, 0.0)])
def test_negative_focal_sum_backward_passes_gradcheck(alpha, gamma):
    """The hand-written backward of the eager (B, R, K) term against numerical derivatives, float64."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 5, 4, generator=g, dtype=torch.float64) * 5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: losses_module._NegativeFocalSum.apply(t, alpha, gamma), (x,))
    ref = ((1 - alpha) * torch.sigmoid(x).pow(gamma) * F.softplus(x)).sum(-1)
    torch.testing.assert_close(losses_module._NegativeFocalSum.apply(x, alpha, gamma), ref)


def test_label_focal_loss_matches_torchvision_at_extreme_logits():
    """Saturated logits (|x| up to 60, where softplus is x or 0 in float32) give torchvision's values and
    gradients: no inf, no NaN from log(0) or from 1 - sigmoid(x) rounding to 0."""
    x = torch.tensor([-60.0, -30, -17, -5, -1e-3, 0, 1e-3, 5, 17, 30, 60])
    logits = x.repeat(2, 11, 1).transpose(1, 2).contiguous().requires_grad_(True)  # (2, 11, 11)
    labels = torch.arange(11).repeat(2, 1) - torch.tensor([[0], [1]])  # the second image: one background row
    ours = losses_module.label_focal_loss(logits, labels)
    onehot = F.one_hot(labels.clamp(min=0), 11).float() * (labels >= 0)[..., None]
    ref = sigmoid_focal_loss(logits, onehot, reduction="none").sum(-1)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    (g_ours,) = torch.autograd.grad(ours.sum(), logits)
    (g_ref,) = torch.autograd.grad(ref.sum(), logits)
    assert torch.isfinite(g_ours).all()
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-6)

