"""Batched post-processing: per-level top-k over the whole batch, NMS over the whole batch, per-image split.

No loop over images: the number of dispatched operations does not depend on the batch size. NMS stops
early: it runs over each image's best candidates and takes more only while an image is still short of
`max_detections` detections (see `_nms_best_first`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms, nms

from cvzoo.detection.boxes import clip_boxes
from cvzoo.detection.structures import Detections

GROUPED_NMS_BUDGET = 2**26  # (groups x largest group^2) IoU entries grouped_nms may hold at once
# pairs a row from which select_topk compacts the pairs above a cut instead of a top-k over all of them
# (CPU): shorter rows are cheap to top-k, and the compaction's ~20 operations would cost more
COMPACT_MIN_PAIRS = 2**14


def iou_above(iou: Tensor, threshold: float) -> Tensor:
    """iou > threshold as torchvision's nms decides it: a float32 IoU against the threshold as a double.
    A float32 tensor compares against the threshold rounded to float32, which differs when the IoU equals
    that rounding (IoU 3/10 against 0.3); comparing against the threshold rounded down instead is the
    same as the double comparison for every float32 IoU."""
    if iou.dtype == torch.float32:
        rounded = torch.tensor(threshold, dtype=torch.float32)
        if rounded.item() > threshold:
            rounded = torch.nextafter(rounded, torch.tensor(-math.inf))
        threshold = rounded.item()
    return iou > threshold


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
    over = iou_above(inter / (area[:, :, None] + area[:, None, :] - inter), iou_threshold)
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
                to_probability: Callable[[Tensor], Tensor] | None = None,
                raw_thresh: float | None = None, prior_logits: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(B, R, K) class scores -> per image the `topk_candidates` best (prior, class) pairs of each level.

    Returns scores (B, N), prior indices (B, N), labels (B, N), N = sum_l min(topk, R_l * K). Pairs at or
    below `score_thresh` get score -1 and are dropped after NMS. Taking the top-k first and thresholding
    the k kept gives the same set as torchvision's threshold-then-top-k per level and image (the pairs
    above the threshold are the best ones). `to_probability`, a monotone map applied to the k kept only,
    lets `scores` be logits (sigmoid of k values, not of all).

    Two stages: the best k pairs of a level lie on the k priors with the best class score (a pair
    outside them is beaten by each of those k priors' best pairs), so a top-k over each prior's maximum
    picks k priors and a top-k over their k x K pairs picks the pairs; a max pass over all scores
    replaces a top-k over all of them. No synchronisation and fixed shapes, unless `raw_thresh` (the
    threshold in the units of `scores`) is given: then each level takes only as many priors as the
    image with the most priors above it has (one synchronisation a level; for CPU, where a sparse
    level then costs one max pass and nothing more).

    `prior_logits` (B, R): `scores` are class logits and a pair's score is sqrt(sigmoid(class logit) *
    sigmoid(prior logit)) (FCOS's and ATSS's centre-ness weighting). Pairs are then ranked by
    logsigmoid(class) + logsigmoid(prior), the log of the squared score, computed for the k x K gathered
    pairs only: the full (B, R, K) score tensor is never materialised. Returned scores are the
    probabilities; `raw_thresh` is in units of that key.
    """
    b, r, k = scores.shape
    # rows of one (B * R, K) view: selecting whole rows with index_select is many times faster on CPU than a
    # gather with an expanded (B, m, K) index
    rows_of = scores.reshape(b * r, k) if scores.is_contiguous() else scores.contiguous().reshape(b * r, k)
    image_offset = torch.arange(b, device=scores.device)[:, None] * r  # (B, 1)
    if raw_thresh is not None:  # a hair below, so that rounding between the key and the score drops nothing
        raw_thresh = raw_thresh - 1e-6 * (1 + abs(raw_thresh))
    out_s, out_i = [], []
    start = 0
    for n in num_per_level:  # static level structure
        level = scores[:, start:start + n]  # (B, n, K)
        level = level if level.dtype == torch.float32 else level.float()  # bf16 would tie many scores
        best_of_prior = level.amax(dim=2)  # (B, n)
        if prior_logits is not None:  # the key is monotone in the class logit: the best class stays the best
            bias = F.logsigmoid(prior_logits[:, start:start + n].float())  # (B, n)
            best_of_prior = F.logsigmoid(best_of_prior) + bias
        m = min(topk_candidates, n)
        if raw_thresh is not None:
            m = min(m, int((best_of_prior > raw_thresh).sum(dim=1).max()))
        prior_best, priors = best_of_prior.topk(m, dim=1, sorted=False)  # (B, m)
        pairs = rows_of.index_select(0, (priors + start + image_offset).reshape(-1)).reshape(b, m, k)  # (B, m, K)
        pairs = pairs if pairs.dtype == torch.float32 else pairs.float()
        if prior_logits is not None:
            pairs = F.logsigmoid(pairs) + torch.gather(bias, 1, priors)[..., None]
        pairs = pairs.reshape(b, -1)  # (B, m*K)
        if raw_thresh is None or m * k < COMPACT_MIN_PAIRS:
            top_s, j = pairs.topk(min(topk_candidates, m * k), dim=1, sorted=False)
        else:
            top_s, j = _topk_above(pairs, prior_best, raw_thresh, topk_candidates)
        out_s.append(top_s)
        out_i.append((torch.gather(priors, 1, torch.div(j, k, rounding_mode="floor")) + start) * k + j % k)
        start += n
    top_scores, flat = torch.cat(out_s, dim=1), torch.cat(out_i, dim=1)
    if prior_logits is not None:
        top_scores = torch.exp(0.5 * top_scores)  # sqrt(sigmoid(class) * sigmoid(prior))
    elif to_probability is not None:
        top_scores = to_probability(top_scores.float())
    top_scores = torch.where(top_scores > score_thresh, top_scores, torch.full_like(top_scores, -1.0))
    return top_scores, torch.div(flat, k, rounding_mode="floor"), flat % k


def _topk_above(pairs: Tensor, prior_best: Tensor, raw_thresh: float, topk: int) -> tuple[Tensor, Tensor]:
    """The best `topk` of each row of `pairs` (B, m*K) among those above `raw_thresh`, padded with -inf:
    (B, N) values and column indices, N <= topk. One synchronisation.

    `prior_best` (B, m) are the maxima of the m priors the pairs come from. When m = topk, those m
    maxima are m pairs at or above their minimum, so every one of the best `topk` pairs is at or above
    it too: a compare and a compaction keep them, and the top-k runs only over the pairs that pass,
    which in the dense regime is about topk of the m*K (each prior's best class only).
    """
    b = pairs.shape[0]
    cut = raw_thresh
    if prior_best.shape[1] == topk:
        cut = prior_best.amin(dim=1, keepdim=True).clamp(min=raw_thresh)  # (B, 1)
    keep = pairs >= cut
    counts = keep.sum(dim=1)
    most = int(counts.max()) if b else 0
    image, column = keep.nonzero().unbind(1)
    slot = torch.arange(image.numel(), device=pairs.device) - (torch.cumsum(counts, 0) - counts)[image]
    values = pairs.new_full((b, most), -math.inf)
    values[image, slot] = pairs[image, column]
    columns = torch.zeros(b, most, dtype=torch.int64, device=pairs.device)
    columns[image, slot] = column
    if most > topk:
        values, j = values.topk(topk, dim=1, sorted=False)
        columns = torch.gather(columns, 1, j)
    return values, columns


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
    prior_logits: Tensor | None = None,
) -> list[Detections]:
    """scores (B, R, K) probabilities (or logits with `to_probability=torch.sigmoid`, or class logits scored
    sqrt(sigmoid(class) * sigmoid(prior)) with `prior_logits` (B, R), see `select_topk`); `decode(prior_idx
    (B, N)) -> (B, N, 4)` xyxy boxes of those priors; image_sizes (B, 2) (H, W) of each unpadded image
    -> one Detections per image, best first.
    """
    b, _, k = scores.shape
    raw_thresh = None  # the threshold in the units of `scores`, to shrink the top-k on CPU
    if prior_logits is not None:
        if not scores.is_cuda and 0 < score_thresh < 1:
            raw_thresh = 2 * math.log(score_thresh)  # key = log(score ** 2)
    elif not scores.is_cuda and to_probability is None:
        raw_thresh = score_thresh
    elif not scores.is_cuda and to_probability is torch.sigmoid and 0 < score_thresh < 1:
        raw_thresh = math.log(score_thresh / (1 - score_thresh))
    top_scores, prior_idx, labels = select_topk(scores, num_per_level, score_thresh, topk_candidates,
                                                to_probability, raw_thresh, prior_logits)
    best, order = torch.sort(top_scores, dim=1, descending=True, stable=True)  # (B, N) best first
    valid = best > score_thresh
    num_valid = valid.sum(dim=1)
    flat = valid.reshape(-1).nonzero()[:, 0]  # the data-dependent step: drops the -1 fillers
    boxes = clip_boxes(decode(torch.gather(prior_idx, 1, order)), image_sizes).reshape(-1, 4)[flat]
    labels = torch.gather(labels, 1, order).reshape(-1)[flat]
    best = best.reshape(-1)[flat]
    return _nms_and_split(boxes, best, labels, flat, top_scores.shape[1], num_valid, k, nms_thresh, max_detections)


def nms_detections(boxes: Tensor, scores: Tensor, labels: Tensor, candidate: Tensor, num_labels: int,
                   nms_thresh: float | None, max_detections: int) -> list[Detections]:
    """Candidates already decoded (two-stage box heads: one box per proposal and class): boxes (B, N, 4),
    scores (B, N), labels (B, N) in [0, num_labels), candidate (B, N) bool -> one Detections per image,
    best first, after NMS within (image, label) and at most `max_detections` each."""
    b, n = scores.shape
    key = torch.where(candidate, scores.float(), torch.full((), -math.inf, device=scores.device))
    best, order = torch.sort(key, dim=1, descending=True, stable=True)  # (B, N) best first
    valid = torch.gather(candidate, 1, order)
    flat = valid.reshape(-1).nonzero()[:, 0]
    boxes = torch.gather(boxes, 1, order[..., None].expand(-1, -1, 4)).reshape(-1, 4)[flat]
    labels = torch.gather(labels, 1, order).reshape(-1)[flat]
    return _nms_and_split(boxes, best.reshape(-1)[flat], labels, flat, n, valid.sum(dim=1), num_labels,
                          nms_thresh, max_detections)


def _nms_and_split(boxes: Tensor, best: Tensor, labels: Tensor, flat: Tensor, n: int, num_valid: Tensor,
                   num_labels: int, nms_thresh: float | None, max_detections: int) -> list[Detections]:
    """The kept candidates of a (B, n) best-first layout (`flat`: their flat indices; boxes, best, labels
    gathered for them) -> NMS within (image, label), the best `max_detections` of each image."""
    b = num_valid.numel()
    image_of, position = torch.div(flat, n, rounding_mode="floor"), flat % n
    if nms_thresh is None:  # already best first within each image
        kept = torch.arange(best.numel(), device=best.device)
    else:
        kept = _nms_best_first(boxes.float(), image_of * num_labels + labels, image_of, position, num_valid,
                               nms_thresh, max_detections)
    image_of = image_of[kept]
    order = torch.sort(image_of, stable=True).indices  # group by image, best first within each
    kept, image_of = kept[order], image_of[order]
    rank, _ = rank_within_groups(image_of, b)
    top = rank < max_detections
    kept, image_of = kept[top], image_of[top]
    sizes = torch.bincount(image_of, minlength=b).tolist()
    return [Detections(*parts) for parts in zip(boxes[kept].split(sizes), best[kept].split(sizes),
                                                labels[kept].split(sizes))]


def _nms_best_first(boxes: Tensor, groups: Tensor, image_of: Tensor, position: Tensor, num_valid: Tensor,
                    iou_threshold: float, max_detections: int) -> Tensor:
    """NMS within groups that stops once each image keeps `max_detections`: kept indices, best first
    within each image.

    `position` is each box's rank by score within its image (stable: equal scores keep their order,
    whatever the chunks). `num_valid` (B,) is the number of boxes of each image. Greedy NMS decides a
    box from the better boxes of its image only, so NMS over each image's best m boxes decides them
    exactly as NMS over all would, and a suppressed box suppresses nothing. The prefix grows, for the
    images still short of `max_detections` and with boxes left, until none is: the next boxes are
    first tested against the boxes kept so far (one padded IoU block, (boxes, most kept in a group)),
    then NMS runs among the survivors. Most of the quadratic NMS work past an image's last detection is skipped.
    """
    b = num_valid.numel()
    m = 2 * max_detections
    kept = torch.empty(0, dtype=torch.int64, device=boxes.device)
    lo = 0
    while True:
        chunk = ((position >= lo) & (position < m)).nonzero()[:, 0]
        if kept.numel():
            chunk = chunk[~_overlaps_kept(boxes, groups, kept, chunk, iou_threshold)]
        rank_as_score = -position[chunk].to(boxes.dtype)
        kept = torch.cat([kept, chunk[batched_nms_once(boxes[chunk], rank_as_score, groups[chunk], iou_threshold)]])
        kept_per_image = torch.bincount(image_of[kept], minlength=b)
        short = (kept_per_image < max_detections) & (num_valid > m)
        if not bool(short.any()):
            return kept
        # grow to where the slowest image should reach max_detections at its keep rate so far
        fewest = int(kept_per_image.masked_fill(~short, m).min())
        lo, m = m, m + max(m // 2, math.ceil(1.25 * (max_detections - fewest) * m / max(fewest, 1)))
        position = position.masked_fill(~short[image_of], -1)  # images already done take no more boxes


def _overlaps_kept(boxes: Tensor, groups: Tensor, kept: Tensor, candidates: Tensor, iou_threshold: float) -> Tensor:
    """(C,) bool: candidate overlaps (IoU > threshold) a kept box of its group. Kept boxes are laid out
    coordinate-major in a padded (4, groups, most kept in a group) block; each candidate meets its group's
    row. The IoU is torchvision's nms arithmetic, operation for operation, so the decisions are the same."""
    kept = kept[torch.sort(groups[kept], stable=True).indices]
    ids, slot, counts = torch.unique_consecutive(groups[kept], return_inverse=True, return_counts=True)
    rank = torch.arange(kept.numel(), device=kept.device) - (torch.cumsum(counts, 0) - counts)[slot]
    block = boxes.new_zeros(4, ids.numel() + 1, int(counts.max()))  # the last row: groups with no kept box
    block[:, slot, rank] = boxes[kept].T
    x1, y1, x2, y2 = block.unbind(0)  # (groups + 1, S) each
    group = groups[candidates]
    row = torch.searchsorted(ids, group).clamp(max=ids.numel() - 1)
    row = torch.where(ids[row] == group, row, ids.numel())  # (C,)
    a = boxes[candidates]  # (C, 4)
    w = (torch.minimum(x2[row], a[:, 2:3]) - torch.maximum(x1[row], a[:, 0:1])).clamp_(min=0)  # (C, S)
    h = (torch.minimum(y2[row], a[:, 3:4]) - torch.maximum(y1[row], a[:, 1:2])).clamp_(min=0)
    inter = w.mul_(h)
    union = ((x2 - x1) * (y2 - y1))[row].add_(((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]))[:, None]).sub_(inter)
    return iou_above(inter.div_(union), iou_threshold).any(dim=1)
