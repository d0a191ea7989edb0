"""Detection losses, batched over (B, R, ...) with masks instead of boolean indexing (static shapes).

All run in float32 (inputs are upcast) so they stay exact under autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss

from cvzoo.detection.boxes import elementwise_giou


def label_focal_loss(logits: Tensor, labels: Tensor, weight: Tensor | None = None, alpha: float = 0.25,
                     gamma: float = 2.0) -> Tensor:
    """Sigmoid focal loss against one-hot targets given as labels, summed over classes: (B, R, K) logits,
    (B, R) labels (-1: background) -> (B, R). Equal to `focal_loss(logits, one_hot(labels))`.

    Every element is first scored as a negative, (1 - alpha) sigmoid(x)^gamma softplus(x); the one
    positive class of each foreground row is then corrected from (B, R) gathers. The (B, R, K) tensor
    is streamed through a handful of passes instead of torchvision's ~15 (plus a one-hot target),
    which is what bounds this loss in eager mode: it is memory-bound at detection sizes.
    """
    x = logits.float()
    if torch.compiler.is_compiling():
        # softplus through exp and log: inductor's softplus is a scalar log1p loop, 4x slower on CPU. Each
        # exp / log / sigmoid result has ONE user: inductor's CPU backend writes a reused result of such an
        # op to memory (a (B, R, K) buffer, its first touch alone ~25 ms at batch 16) instead of fusing it
        softplus = torch.relu(x) + torch.log(1 + torch.exp(-x.abs()))
        neg = ((1 - alpha) * torch.sigmoid(x).pow(gamma) * softplus).sum(-1)  # (B, R): every class as a negative
    else:  # eager: a hand-written backward, fewest passes over the (B, R, K) tensor
        neg = _NegativeFocalSum.apply(x, alpha, gamma)
    fg = labels >= 0
    xp = torch.gather(x, -1, labels.clamp(min=0)[..., None])[..., 0]  # (B, R) logit of the labelled class
    sp, softplus_p = torch.sigmoid(xp), F.softplus(xp)  # (B, R): the scalar softplus is cheap here
    as_pos = alpha * (1 - sp).pow(gamma) * (softplus_p - xp)  # softplus(-x) = softplus(x) - x
    as_neg = (1 - alpha) * sp.pow(gamma) * softplus_p
    loss = neg + torch.where(fg, as_pos - as_neg, 0.0)
    return loss if weight is None else loss * weight


class _NegativeFocalSum(torch.autograd.Function):
    """(B, R, K) logits x -> (B, R) sum over K of (1 - alpha) sigmoid(x)^gamma softplus(x), the focal loss
    of every element scored as a negative, with a hand-written backward.

    d/dx [s^g softplus(x)] = s^g (g (1 - s) softplus(x) + s), s = sigmoid(x). Forward and backward each
    take a few in-place passes over the (B, R, K) tensor and keep two of its size (s, softplus(x)) for the
    backward; autograd's version of the same expression takes about twice as many passes, and F.softplus
    is a scalar loop on CPU (33 ms for 6 M elements against 1.5 ms for sigmoid): softplus(x) is
    relu(x) - log(sigmoid(|x|)) here, sigmoid(|x|) = max(s, 1 - s), one vectorised log. Checked against
    autograd in float64 (gradcheck) and against torchvision.
    """

    @staticmethod
    def forward(ctx, x: Tensor, alpha: float, gamma: float) -> Tensor:
        # three (B, R, K) allocations, each a first touch of fresh pages (~25 ms for 100 MB on CPU)
        s = torch.sigmoid(x)
        scratch = torch.rsub(s, 1).clamp_(min=s).log_()  # log(sigmoid(|x|))
        softplus = torch.clamp(x, min=0).sub_(scratch)  # relu(x) - log(sigmoid(|x|))
        ctx.save_for_backward(s, softplus)
        ctx.alpha, ctx.gamma = alpha, gamma
        weighted = torch.mul(s, s, out=scratch) if gamma == 2 else torch.pow(s, gamma, out=scratch)
        return weighted.mul_(softplus).sum(-1).mul_(1 - alpha)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        s, softplus = ctx.saved_tensors
        alpha, gamma = ctx.alpha, ctx.gamma
        out = torch.mul(softplus, gamma * (1 - alpha))
        out.addcmul_(out, s, value=-1).add_(s, alpha=1 - alpha)  # (1 - alpha) (g (1 - s) softplus + s)
        if gamma == 2:
            out.mul_(s).mul_(s)
        else:
            out.mul_(s.pow(gamma))
        return out.mul_(grad[..., None]), None, None


def focal_loss(logits: Tensor, targets: Tensor, weight: Tensor | None = None, alpha: float = 0.25,
               gamma: float = 2.0) -> Tensor:
    """Sigmoid focal loss (torchvision.ops) per element, summed over the last dim: (B, R, K) -> (B, R).

    `weight (B, R)` zeroes ignored rows.
    """
    loss = sigmoid_focal_loss(logits.float(), targets.float(), alpha=alpha, gamma=gamma, reduction="none").sum(-1)
    return loss if weight is None else loss * weight


def l1_loss(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """Summed L1 over the last dim, masked: (B, R, 4) -> (B, R). Masked rows give exact zeros, even with
    non-finite targets there."""
    diff = (pred.float() - target.float()).abs().sum(-1)
    return torch.where(weight > 0, diff * weight, torch.zeros_like(diff))


def smooth_l1_loss(pred: Tensor, target: Tensor, weight: Tensor, beta: float = 1.0 / 9) -> Tensor:
    """Summed smooth-L1 over the last dim, masked: (B, R, 4) -> (B, R). Masked rows' targets are replaced
    first: smooth-L1's backward would turn a zero gradient times a NaN target into NaN."""
    target = torch.where(weight[..., None] > 0, target.float(), pred.detach().float())
    diff = F.smooth_l1_loss(pred.float(), target, beta=beta, reduction="none").sum(-1)
    return torch.where(weight > 0, diff * weight, torch.zeros_like(diff))


def giou_loss(pred_boxes: Tensor, target_boxes: Tensor, weight: Tensor) -> Tensor:
    """1 - GIoU of matching xyxy rows, masked: (B, R, 4) -> (B, R) (torchvision's generalized_box_iou_loss).

    Masked rows get a harmless unit box as target, so no NaN reaches the gradient through them.
    """
    keep = weight > 0
    unit = torch.tensor([0.0, 0.0, 1.0, 1.0], device=pred_boxes.device)
    pred = torch.where(keep[..., None], pred_boxes.float(), unit)
    target = torch.where(keep[..., None], target_boxes.float(), unit)
    return torch.where(keep, (1 - elementwise_giou(pred, target)) * weight, torch.zeros_like(weight))


def centerness_loss(logits: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """BCE-with-logits on centre-ness, masked: (B, R), (B, R) -> (B, R)."""
    target = torch.where(weight > 0, target.float(), torch.zeros_like(target, dtype=torch.float32))
    loss = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    return torch.where(weight > 0, loss * weight, torch.zeros_like(loss))


def gaussian_focal_loss(logits: Tensor, heatmap: Tensor, alpha: float = 2.0, beta: float = 4.0) -> Tensor:
    """CornerNet/CenterNet focal loss on Gaussian heatmaps, summed: (B, R, K) logits, (B, R, K) targets in
    [0, 1] with exact 1 at object centres -> (B,) per-image sums.

    pos: -(1 - p)^alpha log p; neg: -(1 - y)^beta p^alpha log(1 - p). log-sigmoid keeps it finite.
    """
    logits, heatmap = logits.float(), heatmap.float()
    p = torch.sigmoid(logits)
    pos = heatmap.eq(1).float()
    pos_loss = -F.logsigmoid(logits) * (1 - p).pow(alpha) * pos
    neg_loss = -F.logsigmoid(-logits) * p.pow(alpha) * (1 - heatmap).pow(beta) * (1 - pos)
    return (pos_loss + neg_loss).sum(dim=(1, 2))
