"""cvzoo.detection.assigners against per-image references: torchvision's Matcher, torchvision FCOS's matching
block, and a per-gt loop of MMDetection's ATSS."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection._utils import Matcher
from torchvision.ops import box_iou

from cvzoo.detection.assigners import (
    BACKGROUND,
    IGNORE,
    ATSSAssigner,
    FCOSAssigner,
    MaxIoUAssigner,
    chunked_iou,
    fcos_size_ranges,
    gather_targets,
)
from cvzoo.detection.priors import AnchorGenerator, PointGenerator, retinanet_anchor_sizes
from cvzoo.detection.structures import TargetBatch

STRIDES = (8, 16, 32, 64, 128)


def _targets(counts, image: float, min_wh: float, max_wh: float, num_classes: int = 4, seed: int = 0,
             ) -> TargetBatch:
    """Random boxes inside an image x image picture; counts per image (0 allowed) -> padded TargetBatch."""
    g = torch.Generator().manual_seed(seed)
    targets = []
    for n in counts:
        wh = min_wh + torch.rand(n, 2, generator=g) * (max_wh - min_wh)
        xy = torch.rand(n, 2, generator=g) * (image - wh)
        labels = torch.randint(0, num_classes, (n,), generator=g)
        targets.append({"boxes": torch.cat([xy, xy + wh], dim=-1), "labels": labels})
    return TargetBatch.from_list(targets, num_images=len(counts), num_classes=num_classes)


def _real(targets: TargetBatch, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes of image i without padding, and their row indices in the padded batch."""
    rows = (targets.labels[i] >= 0).nonzero()[:, 0]
    return targets.boxes[i, rows], rows


def _map_rows(matched: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    if rows.numel() == 0:
        return matched
    return torch.where(matched >= 0, rows[matched.clamp(min=0)], matched)


# ---------------------------------------------------------------- MaxIoUAssigner


def _retina_anchors(image: int = 128) -> tuple[torch.Tensor, list[int]]:
    sizes = [(image // s, image // s) for s in STRIDES]
    gen = AnchorGenerator(retinanet_anchor_sizes(), (0.5, 1.0, 2.0), STRIDES)
    return gen(sizes), [h * w * gen.num_anchors for h, w in sizes]


def _matcher_reference(anchors, targets, fg, bg, allow_low_quality):
    out = []
    for i in range(targets.labels.shape[0]):
        gt, rows = _real(targets, i)
        if gt.shape[0] == 0:
            out.append(torch.full((anchors.shape[0],), -1, dtype=torch.int64))
            continue
        matched = Matcher(fg, bg, allow_low_quality_matches=allow_low_quality)(box_iou(gt, anchors))
        out.append(_map_rows(matched, rows))
    return torch.stack(out)


@pytest.mark.parametrize("allow_low_quality", [True, False])
def test_max_iou_assigner_equals_torchvision_matcher(allow_low_quality):
    anchors, _ = _retina_anchors(128)
    targets = _targets([3, 0, 6], image=128.0, min_wh=6.0, max_wh=110.0, seed=1)
    assert targets.labels.shape == (3, 6) and (targets.labels[0] == -1).sum() == 3
    # every real box overlaps some anchor (the precondition under which torchvision's low-quality rule is defined)
    assert (chunked_iou(targets.boxes, anchors).amax(-1)[targets.valid] > 0).all()
    out = MaxIoUAssigner(0.5, 0.4, allow_low_quality_matches=allow_low_quality)(anchors, targets)
    expected = _matcher_reference(anchors, targets, 0.5, 0.4, allow_low_quality)
    assert out.shape == (3, anchors.shape[0]) and out.dtype == torch.int64
    assert torch.equal(out, expected)
    assert (out[1] == BACKGROUND).all()
    # the case must exercise foreground, ignore and background
    assert (out >= 0).any() and (out == IGNORE).any() and (out == BACKGROUND).any()


def test_max_iou_assigner_low_quality_matches_claim_a_prior_for_small_boxes():
    anchors, _ = _retina_anchors(128)
    tb = TargetBatch.from_list([{"boxes": torch.tensor([[10.0, 10.0, 16.0, 17.0], [40.0, 40.0, 100.0, 90.0]]),
                                 "labels": torch.tensor([1, 2])}], num_images=1, num_classes=3)
    with_low = MaxIoUAssigner(0.5, 0.4, True)(anchors, tb)
    without = MaxIoUAssigner(0.5, 0.4, False)(anchors, tb)
    assert not (without == 0).any()  # the small box reaches no 0.5 IoU
    best = box_iou(tb.boxes[0, :1], anchors)[0]
    assert set((with_low == 0).nonzero()[:, 1].tolist()) == set((best == best.max()).nonzero()[:, 0].tolist())
    assert torch.equal(with_low, _matcher_reference(anchors, tb, 0.5, 0.4, True))


def test_max_iou_assigner_rejects_bad_thresholds():
    with pytest.raises(ValueError, match="bg_iou_thresh"):
        MaxIoUAssigner(0.4, 0.5)


def test_chunked_iou_equals_torchvision():
    anchors, _ = _retina_anchors(128)
    targets = _targets([2, 3], image=128.0, min_wh=6.0, max_wh=110.0, seed=2)
    out = chunked_iou(targets.boxes, anchors, chunk=1000)  # several chunks, the last one partial
    expected = torch.stack([box_iou(targets.boxes[i], anchors) for i in range(2)])
    torch.testing.assert_close(out, expected)


# ---------------------------------------------------------------- FCOSAssigner


def _tv_fcos_matching(targets_list, anchors_list, num_anchors_per_level, center_sampling_radius=1.5):
    """Copied from torchvision.models.detection.fcos.FCOS.compute_loss (the matching block)."""
    matched_idxs = []
    for anchors_per_image, targets_per_image in zip(anchors_list, targets_list):
        if targets_per_image["boxes"].numel() == 0:
            matched_idxs.append(
                torch.full((anchors_per_image.size(0),), -1, dtype=torch.int64, device=anchors_per_image.device)
            )
            continue

        gt_boxes = targets_per_image["boxes"]
        gt_centers = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2  # Nx2
        anchor_centers = (anchors_per_image[:, :2] + anchors_per_image[:, 2:]) / 2  # N
        anchor_sizes = anchors_per_image[:, 2] - anchors_per_image[:, 0]
        # center sampling: anchor point must be close enough to gt center.
        pairwise_match = (anchor_centers[:, None, :] - gt_centers[None, :, :]).abs_().max(
            dim=2
        ).values < center_sampling_radius * anchor_sizes[:, None]
        # compute pairwise distance between N points and M boxes
        x, y = anchor_centers.unsqueeze(dim=2).unbind(dim=1)  # (N, 1)
        x0, y0, x1, y1 = gt_boxes.unsqueeze(dim=0).unbind(dim=2)  # (1, M)
        pairwise_dist = torch.stack([x - x0, y - y0, x1 - x, y1 - y], dim=2)  # (N, M)

        # anchor point must be inside gt
        pairwise_match &= pairwise_dist.min(dim=2).values > 0

        # each anchor is only responsible for certain scale range.
        lower_bound = anchor_sizes * 4
        lower_bound[: num_anchors_per_level[0]] = 0
        upper_bound = anchor_sizes * 8
        upper_bound[-num_anchors_per_level[-1]:] = float("inf")
        pairwise_dist = pairwise_dist.max(dim=2).values
        pairwise_match &= (pairwise_dist > lower_bound[:, None]) & (pairwise_dist < upper_bound[:, None])

        # match the GT box with minimum area, if there are multiple GT matches
        gt_areas = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])  # N
        pairwise_match = pairwise_match.to(torch.float32) * (1e8 - gt_areas[None, :])
        min_values, matched_idx = pairwise_match.max(dim=1)  # R, per-anchor match
        matched_idx[min_values < 1e-5] = -1  # unmatched anchors are assigned -1

        matched_idxs.append(matched_idx)
    return matched_idxs


def test_fcos_size_ranges():
    assert fcos_size_ranges(STRIDES) == [(0.0, 64.0), (64.0, 128.0), (128.0, 256.0), (256.0, 512.0),
                                         (512.0, math.inf)]


def test_fcos_assigner_equals_torchvision_fcos_matching():
    image = 256
    sizes = [(image // s, image // s) for s in STRIDES]
    points, strides = PointGenerator(STRIDES, offset=0.0)(sizes)
    anchors = torch.cat([points - strides[:, None] / 2, points + strides[:, None] / 2], dim=-1)  # side = stride
    num_per_level = [h * w for h, w in sizes]
    targets = _targets([4, 0, 12, 1], image=float(image), min_wh=8.0, max_wh=250.0, seed=3)
    out = FCOSAssigner(1.5)(points, strides, targets, num_per_level, STRIDES)

    targets_list = []
    for i in range(4):
        gt, rows = _real(targets, i)
        targets_list.append({"boxes": gt, "labels": targets.labels[i, rows]})
    matched = _tv_fcos_matching(targets_list, [anchors] * 4, num_per_level)
    expected = torch.stack([_map_rows(m, _real(targets, i)[1]) for i, m in enumerate(matched)])
    assert out.shape == (4, points.shape[0])
    assert torch.equal(out, expected)
    assert (out[1] == BACKGROUND).all()
    # non-trivial: several levels and several boxes take part, and overlapping boxes compete
    level = torch.repeat_interleave(torch.arange(len(STRIDES)), torch.tensor(num_per_level))
    assert len(set(level[(out >= 0).any(0)].tolist())) >= 3
    assert len(set(out[2][out[2] >= 0].tolist())) >= 6


def test_fcos_assigner_rejects_bad_arguments():
    with pytest.raises(ValueError, match="center_sampling_radius"):
        FCOSAssigner(0.0)
    points, strides = PointGenerator((8, 16))([(2, 2), (1, 1)])
    tb = _targets([1], image=16.0, min_wh=2.0, max_wh=8.0)
    with pytest.raises(ValueError, match="size_ranges"):
        FCOSAssigner(size_ranges=[(0, 64)])(points, strides, tb, [4, 1], (8, 16))


# ---------------------------------------------------------------- ATSSAssigner


def _atss_reference(priors, targets, num_per_level, topk):
    """MMDetection's ATSSAssigner, one image and one gt box at a time, in plain Python where it decides."""
    centres = ((priors[:, :2] + priors[:, 2:]) / 2).double()
    r = priors.shape[0]
    out = torch.full((targets.labels.shape[0], r), -1, dtype=torch.int64)
    for i in range(targets.labels.shape[0]):
        best = [-math.inf] * r
        for j in range(targets.labels.shape[1]):
            if targets.labels[i, j] < 0:
                continue
            box = targets.boxes[i, j]
            iou = box_iou(box[None], priors)[0].double()
            x1, y1, x2, y2 = box.double().tolist()
            gc = torch.tensor([(x1 + x2) / 2, (y1 + y2) / 2], dtype=torch.float64)
            dist = ((centres - gc) ** 2).sum(-1).sqrt().tolist()
            cands, start = [], 0
            for n in num_per_level:
                order = sorted(range(start, start + n), key=lambda p: dist[p])
                cands += order[:min(topk, n)]
                start += n
            cand_iou = iou[cands]
            thr = (cand_iou.mean() + cand_iou.std(unbiased=True)).item()
            for p in cands:
                cx, cy = centres[p].tolist()
                inside = min(cx - x1, cy - y1, x2 - cx, y2 - cy) > 0.01
                if iou[p] >= thr and inside and iou[p].item() > best[p]:  # conflicts: highest IoU wins
                    best[p] = iou[p].item()
                    out[i, p] = j
    return out


@pytest.mark.parametrize(("ratios", "topk"), [((1.0,), 9), ((0.5, 1.0, 2.0), 9), ((1.0,), 4)])
def test_atss_assigner_equals_per_gt_reference(ratios, topk):
    image = 128
    sizes = [(image // s, image // s) for s in STRIDES]
    gen = AnchorGenerator([(8 * s,) for s in STRIDES], ratios, STRIDES)  # ATSS: octave base scale 8
    priors = gen(sizes)
    num_per_level = [h * w * gen.num_anchors for h, w in sizes]
    targets = _targets([5, 0, 8], image=float(image), min_wh=6.0, max_wh=120.0, seed=4)
    out = ATSSAssigner(topk)(priors, targets, num_per_level)
    expected = _atss_reference(priors, targets, num_per_level, topk)
    assert out.shape == (3, priors.shape[0])
    assert torch.equal(out, expected)
    assert (out[1] == BACKGROUND).all()
    assert len(set(out[2][out[2] >= 0].tolist())) >= 5  # most boxes get priors


def test_atss_assigner_conflict_goes_to_highest_iou():
    gen = AnchorGenerator(((32,),), (1.0,), (16,))
    priors = gen([(4, 4)])
    # two nested boxes sharing their centre: candidates coincide, the one with the higher IoU must win
    tb = TargetBatch.from_list([{"boxes": torch.tensor([[4.0, 4.0, 44.0, 44.0], [14.0, 14.0, 34.0, 34.0]]),
                                 "labels": torch.tensor([0, 1])}], num_images=1, num_classes=2)
    out = ATSSAssigner(4)(priors, tb, [16])
    expected = _atss_reference(priors, tb, [16], 4)
    assert torch.equal(out, expected)
    assert (out >= 0).any()


def test_atss_assigner_rejects_bad_topk():
    with pytest.raises(ValueError, match="topk"):
        ATSSAssigner(0)


# ---------------------------------------------------------------- gather_targets


def test_gather_targets_equals_loop():
    targets = _targets([3, 0, 2], image=64.0, min_wh=4.0, max_wh=30.0, seed=5)
    g = torch.Generator().manual_seed(6)
    matched = torch.randint(-2, 3, (3, 10), generator=g)
    matched[1] = torch.randint(-2, 0, (10,), generator=g)  # the empty image only has background / ignore
    matched[2] = torch.where(matched[2] == 2, torch.ones_like(matched[2]), matched[2])
    boxes, labels = gather_targets(targets, matched)
    assert boxes.shape == (3, 10, 4) and labels.shape == (3, 10)
    for i in range(3):
        for r in range(10):
            m = int(matched[i, r])
            if m >= 0:
                assert labels[i, r] == targets.labels[i, m]
                assert torch.equal(boxes[i, r], targets.boxes[i, m])
            else:
                assert labels[i, r] == -1
