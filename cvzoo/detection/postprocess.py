"""Batched post-processing: per-level top-k over the whole batch, one batched_nms call, per-image split.

The number of dispatched operations does not depend on the batch size: no loop over images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torchvision.ops import nms

from cvzoo.detection.boxes import clip_boxes
from cvzoo.detection.structures import Detections


def batched_nms_once(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """NMS within groups (image x class) as ONE torchvision.ops.nms call: boxes of different groups are
    shifted apart so they never overlap (the coordinate trick of torchvision's batched_nms, which on CPU
    switches to a Python loop over groups past 1,000 boxes). Returns kept indices, best score first.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    # float64: shifts reach num_images * num_classes * max_coordinate, where float32 would round the
    # coordinates enough to flip decisions near the IoU threshold
    boxes = boxes.double()
    shift = groups.double() * (boxes.max() + 1)
    return nms(boxes + shift[:, None], scores.double(), iou_threshold)


def select_topk(scores: Tensor, num_per_level: Sequence[int], score_thresh: float,
                topk_candidates: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, R, K) class scores -> per image the `topk_candidates` best (prior, class) pairs of each level.

    Returns scores (B, N), prior indices (B, N), labels (B, N), N = sum_l min(topk, R_l * K). Pairs at or
    below `score_thresh` keep their rank but are set to -1, so they never displace a better pair and are
    dropped after NMS: the kept set equals torchvision's threshold-then-top-k per level and image.
    """
    k = scores.shape[-1]
    out_s, out_i = [], []
    start = 0
    for n in num_per_level:  # static level structure
        s = scores[:, start:start + n].reshape(scores.shape[0], -1)  # (B, n*K)
        s = torch.where(s > score_thresh, s, torch.full((), -1.0, device=s.device, dtype=s.dtype))
        top_s, top_i = s.topk(min(topk_candidates, n * k), dim=1)
        out_s.append(top_s)
        out_i.append(top_i + start * k)
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
) -> list[Detections]:
    """scores (B, R, K) probabilities; `decode(prior_idx (B, N)) -> (B, N, 4)` xyxy boxes of those priors;
    image_sizes (B, 2) (H, W) of each unpadded image -> one Detections per image, best first.
    """
    b, _, k = scores.shape
    top_scores, prior_idx, labels = select_topk(scores, num_per_level, score_thresh, topk_candidates)
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
    counts = torch.bincount(image_of, minlength=b)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(kept.numel(), device=kept.device) - first[image_of]
    top = rank < max_detections
    kept, image_of = kept[top], image_of[top]
    sizes = torch.bincount(image_of, minlength=b).tolist()
    return [Detections(*parts) for parts in zip(boxes[kept].split(sizes), top_scores[kept].split(sizes),
                                                labels[kept].split(sizes))]
