"""Segmentation losses on (B, K, H, W) logits and (B, H, W) labels, pixels labelled `ignore_index` left out.

Computed in float32 (log-probabilities and sorted errors are delicate under autocast).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _probs_and_onehot(logits: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """-> softmax probabilities (B, K, H, W), one-hot labels (B, K, H, W) (zeros on ignored pixels) and
    the valid-pixel mask (B, 1, H, W)."""
    k = logits.shape[1]
    valid = (labels != ignore_index)[:, None]  # (B, 1, H, W)
    probs = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(torch.where(valid[:, 0], labels, torch.zeros_like(labels)), k).permute(0, 3, 1, 2)
    return probs, onehot.float() * valid, valid


def dice_loss(logits: Tensor, labels: Tensor, ignore_index: int = 255, eps: float = 1.0) -> Tensor:
    """Soft multi-class Dice loss: 1 - mean over the classes present in the batch's labels of
    (2 |P n Y| + eps) / (|P| + |Y| + eps), sums over the batch's valid pixels (a class absent from the labels
    neither dilutes nor inflates the mean, as segmentation_models.pytorch's DiceLoss). -> scalar, 0 when no
    valid pixel is labelled."""
    probs, onehot, valid = _probs_and_onehot(logits, labels, ignore_index)
    probs = probs * valid
    inter = (probs * onehot).sum(dim=(0, 2, 3))  # (K,)
    gts = onehot.sum(dim=(0, 2, 3))
    score = (2 * inter + eps) / (probs.sum(dim=(0, 2, 3)) + gts + eps).clamp(min=1e-12)
    present = gts > 0
    return torch.where(present, 1.0 - score, torch.zeros_like(score)).sum() / present.sum().clamp(min=1)


def lovasz_softmax_loss(logits: Tensor, labels: Tensor, ignore_index: int = 255) -> Tensor:
    """Lovasz-softmax (Berman et al. 2018): the Lovasz extension of the Jaccard loss per class, over the batch's
    valid pixels, averaged over the classes present in the labels. -> scalar (0 when no pixel is valid)."""
    probs, onehot, valid = _probs_and_onehot(logits, labels, ignore_index)
    k = probs.shape[1]
    probs = probs.permute(1, 0, 2, 3).reshape(k, -1)  # (K, N) over all pixels
    fg = onehot.permute(1, 0, 2, 3).reshape(k, -1)
    keep = valid.reshape(1, -1).expand(k, -1)
    errors = torch.where(keep, (fg - probs).abs(), torch.full_like(probs, -1.0))  # ignored pixels sort last
    errors_sorted, order = torch.sort(errors, dim=1, descending=True)
    fg_sorted = torch.gather(fg, 1, order)
    gts = fg_sorted.sum(dim=1, keepdim=True)  # (K, 1)
    intersection = gts - fg_sorted.cumsum(dim=1)
    union = gts + (1.0 - fg_sorted).cumsum(dim=1)
    jaccard = 1.0 - intersection / union.clamp(min=1e-12)
    grad = torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], dim=1)  # Lovasz gradient per rank
    per_class = (errors_sorted.clamp(min=0) * grad).sum(dim=1)  # ignored pixels: error clamped to 0
    present = gts[:, 0] > 0
    return torch.where(present, per_class, torch.zeros_like(per_class)).sum() / present.sum().clamp(min=1)
