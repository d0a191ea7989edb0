"""Batched post-processing: per-level top-k over the whole batch, one batched_nms call, per-image split.

The number of dispatched operations does not depend on the batch size: no loop over images.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torchvision.ops import batched_nms, nms

from cvzoo.detection.boxes import clip_boxes
from cvzoo.detection.structures import Detections

GROUPED_NMS_BUDGET = 2**26  # (groups x largest group^2) IoU entries grouped_nms may hold at once


def grouped_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float,
                max_elements: int = GROUPED_NMS_BUDGET) -> Tensor | None:
    """Exact greedy NMS within groups, all groups at once: (N, 4), (N,), (N,) -> kept indices, best first,
    or None when the padded (groups, S, S) IoU block would exceed `max_elements` (S: largest group).

    Boxes are laid out (group, rank by score) in a padded block; `over[g, i, j]` says box i outranks
    and overlaps box j. Greedy NMS is the unique fixed point of keep[j] = not any_i (keep[i] and
    over[i, j]); iterating from keep = all converges to it, at most S rounds and in practice a few
    (the depth of suppression chains). Same decisions as torchvision's nms (IoU > threshold suppresses).
    """
    n = boxes.shape[0]
    order = torch.sort(scores, descending=True, stable=True).indices
    order = order[torch.sort(groups[order], stable=True).indices]  # by group, best first within each
    _, segment, counts = torch.unique_consecutive(groups[order], return_inverse=True, return_counts=True)
    num_groups, size = counts.numel(), int(counts.max())
    if num_groups * size * size > max_elements:
        return None
    rank = torch.arange(n, device=boxes.device) - (torch.cumsum(counts, 0) - counts)[segment]
    block = boxes.new_zeros(num_groups, size, 4)
    block[segment, rank] = boxes[order]
    valid = torch.zeros(num_groups, size, dtype=torch.bool, device=boxes.device)
    valid[segment, rank] = True
    wh = (torch.minimum(block[:, :, None, 2:], block[:, None, :, 2:])
          - torch.maximum(block[:, :, None, :2], block[:, None, :, :2])).clamp(min=0)
    inter = wh.prod(-1)  # (G, S, S)
    area = (block[..., 2:] - block[..., :2]).prod(-1)  # (G, S)
    over = inter / (area[:, :, None] + area[:, None, :] - inter) > iou_threshold
    over &= torch.ones(size, size, dtype=torch.bool, device=boxes.device).triu(1)  # i outranks j
    keep = valid
    while True:
        new = valid & ~(over & keep[:, :, None]).any(dim=1)
        if torch.equal(new, keep):
            break
        keep = new
    kept = order[keep[segment, rank]]
    return kept[torch.sort(scores[kept], descending=True, stable=True).indices]


def batched_nms_once(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """NMS within groups (image x class) for the whole batch. Returns kept indices, best score first.

    On CUDA: `grouped_nms` (all groups in one padded block, a few rounds) when the block fits, else ONE
    torchvision.ops.nms call with groups shifted apart (the coordinate trick; its mask grows with the
    square of the whole batch's box count). On CPU: torchvision's batched_nms, which uses the trick up
    to 1,000 boxes and past that loops over the groups, faster there than either batched form.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    if not boxes.is_cuda:
        return batched_nms(boxes, scores, groups, iou_threshold)
    kept = grouped_nms(boxes, scores, groups, iou_threshold)
    if kept is not None:
        return kept
    # float64: shifts reach num_images * num_classes * max_coordinate, where float32 would round the
    # coordinates enough to flip decisions near the IoU threshold
    boxes = boxes.double()
    shift = groups.double() * (boxes.max() + 1)
    return nms(boxes + shift[:, None], scores.double(), iou_threshold)


def rank_within_groups(groups: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Sorted group ids (N,) -> each element's position within its group (N,), and group sizes (num_groups,)."""
    counts = torch.bincount(groups, minlength=num_groups)
    return torch.arange(groups.numel(), device=groups.device) - (torch.cumsum(counts, 0) - counts)[groups], counts


def select_topk(scores: Tensor, num_per_level: Sequence[int], score_thresh: float, topk_candidates: int,
                to_probability: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(B, R, K) class scores -> per image the `topk_candidates` best (prior, class) pairs of each level.

    Returns scores (B, N), prior indices (B, N), labels (B, N), N = sum_l min(topk, R_l * K). Pairs at or
    below `score_thresh` get score -1 and are dropped after NMS. Taking the top-k first and thresholding
    the k kept gives the same set as torchvision's threshold-then-top-k per level and image (the pairs
    above the threshold are the best ones), without a pass over all scores. `to_probability`, a
    monotone map applied to the k kept only, lets `scores` be logits (sigmoid of k values, not of all).
    """
    k = scores.shape[-1]
    out_s, out_i = [], []
    start = 0
    for n in num_per_level:  # static level structure
        s = scores[:, start:start + n].reshape(scores.shape[0], -1)  # (B, n*K)
        s = s if s.dtype == torch.float32 else s.float()  # bf16 under autocast would tie many scores
        top_s, top_i = s.topk(min(topk_candidates, n * k), dim=1)
        out_s.append(top_s)
        out_i.append(top_i + start * k)
        start += n
    top_scores, flat = torch.cat(out_s, dim=1), torch.cat(out_i, dim=1)
    if to_probability is not None:
        top_scores = to_probability(top_scores.float())
    top_scores = torch.where(top_scores > score_thresh, top_scores, torch.full_like(top_scores, -1.0))
    return top_scores, torch.div(flat, k, rounding_mode="floor"), flat % k


def select_topk_sparse(scores: Tensor, num_per_level: Sequence[int], raw_thresh: float, topk_candidates: int,
                       to_probability: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The pairs `select_topk` keeps, found by thresholding first (for CPU, where a top-k over every
    score costs more than a pass that keeps the few above the threshold). `raw_thresh` is the threshold
    in the units of `scores` (a logit when `to_probability` is sigmoid).

    Returns scores, prior indices and labels as (B, N') with N' the largest kept count of an image,
    padded with score -1. Per level: one mask, one nonzero, one sort by (image, score), a rank within
    each image; a constant number of operations, not a loop over images.
    """
    b, _, k = scores.shape
    out_s, out_i = [], []
    start = 0
    for n in num_per_level:
        s = scores[:, start:start + n].reshape(b, -1)  # (B, n*K)
        img, col = (s > raw_thresh).nonzero(as_tuple=True)
        vals = s[img, col].float()
        order = torch.sort(vals, descending=True, stable=True).indices
        order = order[torch.sort(img[order], stable=True).indices]  # by image, best first within each
        img, col, vals = img[order], col[order], vals[order]
        rank, counts = rank_within_groups(img, b)
        keep = rank < topk_candidates
        img, col, vals, rank = img[keep], col[keep], vals[keep], rank[keep]
        width = int(min(topk_candidates, counts.max())) if counts.numel() and img.numel() else 0
        top_s = torch.full((b, width), -1.0, device=s.device)
        top_i = torch.zeros((b, width), dtype=torch.int64, device=s.device)
        top_s[img, rank] = vals if to_probability is None else to_probability(vals)
        top_i[img, rank] = col + start * k
        out_s.append(top_s)
        out_i.append(top_i)
        start += n
    top_scores, flat = torch.cat(out_s, dim=1), torch.cat(out_i, dim=1)
    return top_scores, torch.div(flat, k, rounding_mode="floor"), flat % k


def batched_postprocess(
    scores: Tensor,
    decode: Callable[[Tensor], Tensor],
    num_per_level: Sequence[int],
    image_sizes: Tensor,
    score_thresh: float,
    nms_thresh: float | None,
    topk_candidates: int,
    max_detections: int,
    to_probability: Callable[[Tensor], Tensor] | None = None,
) -> list[Detections]:
    """scores (B, R, K) probabilities (or logits with `to_probability=torch.sigmoid`); `decode(prior_idx
    (B, N)) -> (B, N, 4)` xyxy boxes of those priors; image_sizes (B, 2) (H, W) of each unpadded image
    -> one Detections per image, best first.
    """
    b, _, k = scores.shape
    raw_thresh = score_thresh if to_probability is None else None
    if to_probability is torch.sigmoid and score_thresh > 0:
        raw_thresh = math.log(score_thresh / (1 - score_thresh))  # the threshold as a logit
    if scores.is_cuda or raw_thresh is None:  # dense top-k: no synchronisation, a fixed shape
        top_scores, prior_idx, labels = select_topk(scores, num_per_level, score_thresh, topk_candidates,
                                                    to_probability)
    else:  # CPU: threshold first, as most scores are far below it
        top_scores, prior_idx, labels = select_topk_sparse(scores, num_per_level, raw_thresh, topk_candidates,
                                                           to_probability)
    boxes = clip_boxes(decode(prior_idx), image_sizes)  # (B, N, 4)
    image_idx = torch.arange(b, device=scores.device)[:, None].expand_as(labels)
    keep = (top_scores > score_thresh).reshape(-1)  # the one data-dependent step: drops the -1 fillers
    boxes, top_scores = boxes.reshape(-1, 4)[keep], top_scores.reshape(-1)[keep]
    labels, image_idx = labels.reshape(-1)[keep], image_idx.reshape(-1)[keep]
    if nms_thresh is not None:
        kept = batched_nms_once(boxes.float(), top_scores.float(), image_idx * k + labels, nms_thresh)
    else:
        kept = top_scores.argsort(descending=True)
    image_of = image_idx[kept]
    order = torch.sort(image_of, stable=True).indices  # group by image, best first within each
    kept, image_of = kept[order], image_of[order]
    rank, _ = rank_within_groups(image_of, b)
    top = rank < max_detections
    kept, image_of = kept[top], image_of[top]
    sizes = torch.bincount(image_of, minlength=b).tolist()
    return [Detections(*parts) for parts in zip(boxes[kept].split(sizes), top_scores[kept].split(sizes),
                                                labels[kept].split(sizes))]
