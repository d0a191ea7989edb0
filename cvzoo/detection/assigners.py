"""Assigners: which ground-truth box (if any) each prior learns from, for the whole batch at once.

Every assigner returns `matched (B, R) int64`: an index into the padded target rows, or BACKGROUND
(-1), or IGNORE (-2, neither foreground nor background). Padding rows (label -1) never match. No
loop over images or boxes; shapes depend only on (B, M, R), so everything compiles into one graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from cvzoo.detection.structures import TargetBatch

BACKGROUND = -1
IGNORE = -2
IOU_CHUNK = 32768  # priors per IoU chunk: bounds the (B, M, chunk, 2) temporaries of eager mode


def chunked_iou(gt_boxes: Tensor, priors: Tensor, chunk: int = IOU_CHUNK) -> Tensor:
    """(B, M, 4) x (R, 4) shared priors, or (B, R, 4) per-image ones (proposals) -> (B, M, R) IoU
    (= torchvision's box_iou per image), over prior chunks.

    The chunk count depends on R alone; what can be computed once (areas, corners) is. Each chunk works
    coordinate by coordinate on (B, M, r) tensors, in place where it can: four (B, M, r) allocations a
    chunk instead of a dozen (B, M, r) and (B, M, r, 2) ones, which is what eager mode pays for (fresh
    pages) at detection sizes.
    """
    g = gt_boxes[..., None, :].unbind(-1)  # 4 x (B, M, 1)
    g_area = (g[2] - g[0]) * (g[3] - g[1])  # (B, M, 1)
    p_area = (priors[..., 2] - priors[..., 0]) * (priors[..., 3] - priors[..., 1])  # (R,) or (B, R)
    if priors.ndim == 3:
        priors, p_area = priors[:, None], p_area[:, None]  # (B, 1, R, 4), (B, 1, R)
    out = []
    for i in range(0, priors.shape[-2], chunk):
        p = priors[..., i:i + chunk, :].unbind(-1)  # 4 x (r,) or (B, 1, r)
        w = torch.minimum(g[2], p[2]).sub_(torch.maximum(g[0], p[0])).clamp_(min=0)  # (B, M, r)
        inter = w.mul_(torch.minimum(g[3], p[3]).sub_(torch.maximum(g[1], p[1])).clamp_(min=0))
        union = (g_area + p_area[..., i:i + chunk]).sub_(inter)
        out.append(inter.div_(union))
    return torch.cat(out, dim=-1) if len(out) > 1 else out[0]


def gather_targets(targets: TargetBatch, matched: Tensor) -> tuple[Tensor, Tensor]:
    """Matched boxes (B, R, 4) and labels (B, R) (-1 where the prior has no match)."""
    idx = matched.clamp(min=0)
    boxes = torch.gather(targets.boxes, 1, idx[..., None].expand(-1, -1, 4))  # (B, R, 4)
    labels = torch.gather(targets.labels, 1, idx)  # (B, R)
    return boxes, torch.where(matched >= 0, labels, -1)


class MaxIoUAssigner:
    """IoU thresholds (RetinaNet, Faster R-CNN): a prior is foreground when its best IoU >= fg_iou_thresh,
    background below bg_iou_thresh, ignored between. With `allow_low_quality_matches`, each box also
    claims the priors of its highest IoU (if > 0), so every box gets at least one prior.

    Same decisions as torchvision's `det_utils.Matcher` (applied there image by image).
    """

    def __init__(self, fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.4,
                 allow_low_quality_matches: bool = True) -> None:
        if not 0.0 <= bg_iou_thresh <= fg_iou_thresh <= 1.0:
            raise ValueError(f"need 0 <= bg_iou_thresh <= fg_iou_thresh <= 1, got bg_iou_thresh={bg_iou_thresh}, "
                             f"fg_iou_thresh={fg_iou_thresh}")
        self.fg_iou_thresh = fg_iou_thresh
        self.bg_iou_thresh = bg_iou_thresh
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, priors: Tensor, targets: TargetBatch) -> Tensor:
        """priors (R, 4) xyxy shared by the batch, or (B, R, 4) per image (proposals), targets (B, M)
        -> matched (B, R)."""
        valid = targets.valid[..., None]  # (B, M, 1)
        iou = torch.where(valid, chunked_iou(targets.boxes, priors), torch.full((), -1.0, device=priors.device))
        best, matched = iou.max(dim=1)  # (B, R): padding rows hold -1, so they never win over a real box
        out = torch.where(best >= self.fg_iou_thresh, matched, torch.full_like(matched, IGNORE))
        out = torch.where(best < self.bg_iou_thresh, torch.full_like(matched, BACKGROUND), out)
        if self.allow_low_quality_matches:
            best_per_gt = iou.max(dim=2, keepdim=True).values  # (B, M, 1)
            is_best = (iou == best_per_gt) & valid & (best_per_gt > 0)
            out = torch.where(is_best.any(dim=1), matched, out)
        return out


class ATSSAssigner:
    """Adaptive training sample selection (Zhang et al. 2020): per box, the `topk` priors per level
    closest to its centre are candidates; those with IoU >= mean + std of the candidates' IoUs and
    centre inside the box are foreground; a prior claimed by several boxes takes the highest IoU.
    Everything else is background.
    """

    def __init__(self, topk: int = 9) -> None:
        if topk < 1:
            raise ValueError(f"topk must be positive, got {topk}")
        self.topk = topk

    def __call__(self, priors: Tensor, targets: TargetBatch, num_per_level: Sequence[int]) -> Tensor:
        """priors (R, 4), targets (B, M), `num_per_level` priors of each level (static) -> matched (B, R)."""
        b, m = targets.labels.shape
        iou = chunked_iou(targets.boxes, priors)  # (B, M, R)
        prior_ctr = (priors[:, :2] + priors[:, 2:]) / 2  # (R, 2)
        gt_ctr = (targets.boxes[..., :2] + targets.boxes[..., 2:]) / 2  # (B, M, 2)
        # exact distances: the matmul form of cdist loses precision and reorders near-equal candidates
        dist = torch.cdist(gt_ctr.reshape(b * m, 2), prior_ctr,
                           compute_mode="donot_use_mm_for_euclid_dist").reshape(b, m, -1)  # (B, M, R)
        candidates, start = [], 0
        for n in num_per_level:  # static level structure
            k = min(self.topk, n)
            candidates.append(dist[..., start:start + n].topk(k, dim=-1, largest=False).indices + start)
            start += n
        cand = torch.cat(candidates, dim=-1)  # (B, M, K)
        cand_iou = torch.gather(iou, 2, cand)  # (B, M, K)
        thresh = cand_iou.mean(dim=-1, keepdim=True) + cand_iou.std(dim=-1, keepdim=True)
        cand_ctr = prior_ctr[cand]  # (B, M, K, 2)
        box = targets.boxes[:, :, None, :]  # (B, M, 1, 4)
        ltrb = torch.cat([cand_ctr - box[..., :2], box[..., 2:] - cand_ctr], dim=-1)  # (B, M, K, 4)
        positive = (cand_iou >= thresh) & (ltrb.min(dim=-1).values > 0.01) & targets.valid[..., None]
        pos_mask = torch.zeros_like(iou, dtype=torch.bool).scatter(2, cand, positive)  # (B, M, R)
        masked = torch.where(pos_mask, iou, torch.full((), -1.0, device=iou.device))
        best, matched = masked.max(dim=1)  # (B, R)
        return torch.where(best >= 0, matched, torch.full_like(matched, BACKGROUND))


def fcos_size_ranges(strides: Sequence[int]) -> list[tuple[float, float]]:
    """FCOS's regression ranges: (4 s, 8 s) per level of stride s, open at both ends (0, 64, ..., inf for P3-P7)."""
    ranges = [(4.0 * s, 8.0 * s) for s in strides]
    ranges[0] = (0.0, ranges[0][1])
    ranges[-1] = (ranges[-1][0], float("inf"))
    return ranges


class FCOSAssigner:
    """FCOS assignment for points: a point is a candidate for a box when it lies inside the box, within
    `center_sampling_radius` strides of the box centre, and the box's largest ltrb distance from it is
    inside its level's size range; among candidates the smallest box wins. Everything else is background.

    Same decisions as torchvision's FCOS (which loops over images).
    """

    def __init__(self, center_sampling_radius: float = 1.5,
                 size_ranges: Sequence[tuple[float, float]] | None = None) -> None:
        if center_sampling_radius <= 0:
            raise ValueError(f"center_sampling_radius must be positive, got {center_sampling_radius}")
        self.center_sampling_radius = center_sampling_radius
        self.size_ranges = None if size_ranges is None else [tuple(map(float, r)) for r in size_ranges]

    def __call__(self, points: Tensor, strides: Tensor, targets: TargetBatch, num_per_level: Sequence[int],
                 level_strides: Sequence[int]) -> Tensor:
        """points (R, 2), strides (R,), targets (B, M) -> matched (B, R)."""
        ranges = self.size_ranges or fcos_size_ranges(level_strides)
        if len(ranges) != len(num_per_level):
            raise ValueError(f"size_ranges has {len(ranges)} levels but the detector has {len(num_per_level)}")
        # each point's level from its stride (the levels' strides increase strictly)
        level = torch.bucketize(strides, torch.tensor(level_strides, device=points.device, dtype=strides.dtype))
        # per-prior quantities as (R, 1) columns broadcast against (B, R, M) from the right: few view ops
        bounds = torch.tensor(ranges, device=points.device)[level][:, None, :]  # (R, 1, 2) size range
        lt, rb = targets.boxes[:, None, :, :2], targets.boxes[:, None, :, 2:]  # (B, 1, M, 2) each
        p = points[:, None, :]  # (R, 1, 2)
        ltrb = torch.cat([p - lt, rb - p], dim=-1)  # (B, R, M, 4)
        inside = ltrb.amin(dim=-1) > 0
        reach = ltrb.amax(dim=-1)
        # |point - box centre| per axis is |l - r| / 2 and |t - b| / 2
        in_center = (ltrb[..., :2] - ltrb[..., 2:]).abs().amax(dim=-1) < \
            (2 * self.center_sampling_radius) * strides[:, None]
        in_range = (reach > bounds[..., 0]) & (reach < bounds[..., 1])
        match = in_center & inside & in_range & targets.valid[:, None, :]  # (B, R, M)
        wh = rb - lt  # (B, 1, M, 2)
        area = wh[..., 0] * wh[..., 1]  # (B, 1, M)
        score = match.to(torch.float32) * (1e8 - area)  # torchvision's smallest-area tie break
        best, matched = score.max(dim=2)  # (B, R)
        return torch.where(best < 1e-5, BACKGROUND, matched)
