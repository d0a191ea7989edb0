"""cvzoo.detection.postprocess against a per-image reference of torchvision RetinaNet.postprocess_detections."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder as TVBoxCoder
from torchvision.ops import batched_nms, clip_boxes_to_image

from cvzoo.detection.coders import BoxCoder
from cvzoo.detection.postprocess import batched_postprocess, grouped_nms, select_topk
from cvzoo.detection.priors import AnchorGenerator

STRIDES = (8, 16, 32)
WEIGHTS = (1.0, 1.0, 1.0, 1.0)


def _setup(seed: int = 0, b: int = 3, k: int = 4):
    sizes = [(8, 8), (4, 4), (2, 2)]  # a 64 x 64 padded batch
    gen = AnchorGenerator(((24, 32), (48, 64), (96, 128)), (0.5, 1.0, 2.0), STRIDES)
    anchors = gen(sizes)
    num_per_level = [h * w * gen.num_anchors for h, w in sizes]
    g = torch.Generator().manual_seed(seed)
    r = anchors.shape[0]
    scores = torch.sigmoid(torch.randn(b, r, k, generator=g) * 2 - 2)
    deltas = torch.randn(b, r, 4, generator=g) * 0.3
    return anchors, num_per_level, scores, deltas


def _decoder(deltas: torch.Tensor, anchors: torch.Tensor):
    coder = BoxCoder(WEIGHTS)

    def decode(prior_idx: torch.Tensor) -> torch.Tensor:
        d = torch.gather(deltas, 1, prior_idx[..., None].expand(-1, -1, 4))  # (B, N, 4)
        return coder.decode(d, anchors[prior_idx])

    return decode


def _reference(scores, deltas, anchors, num_per_level, image_sizes, score_thresh, nms_thresh, topk, max_det):
    """torchvision RetinaNet.postprocess_detections, one image at a time, on probabilities."""
    tv_coder = TVBoxCoder(WEIGHTS)
    out = []
    for i in range(scores.shape[0]):
        image_shape = tuple(image_sizes[i].tolist())
        image_boxes, image_scores, image_labels = [], [], []
        start = 0
        for n in num_per_level:
            scores_per_level = scores[i, start:start + n]
            num_classes = scores_per_level.shape[-1]
            flat = scores_per_level.flatten()
            keep_idxs = flat > score_thresh
            flat = flat[keep_idxs]
            topk_idxs = torch.where(keep_idxs)[0]
            num_topk = min(topk, topk_idxs.numel())
            flat, idxs = flat.topk(num_topk)
            topk_idxs = topk_idxs[idxs]
            anchor_idxs = torch.div(topk_idxs, num_classes, rounding_mode="floor") + start
            labels = topk_idxs % num_classes
            boxes = tv_coder.decode_single(deltas[i, anchor_idxs], anchors[anchor_idxs])
            image_boxes.append(clip_boxes_to_image(boxes, image_shape))
            image_scores.append(flat)
            image_labels.append(labels)
            start += n
        boxes, sc, labels = torch.cat(image_boxes), torch.cat(image_scores), torch.cat(image_labels)
        keep = sc.argsort(descending=True) if nms_thresh is None else batched_nms(boxes, sc, labels, nms_thresh)
        keep = keep[:max_det]
        out.append((boxes[keep], sc[keep], labels[keep]))
    return out


def _sorted_rows(boxes, scores, labels):
    """Detections as a set: rows (score, label, box) sorted lexicographically."""
    rows = torch.cat([scores[:, None].double(), labels[:, None].double(), boxes.double()], dim=1)
    return sorted(map(tuple, rows.tolist()))


def _assert_same(det, ref):
    boxes, scores, labels = ref
    assert det.boxes.shape == boxes.shape and det.scores.shape == scores.shape and det.labels.shape == labels.shape
    ours, theirs = _sorted_rows(det.boxes, det.scores, det.labels), _sorted_rows(boxes, scores, labels)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a[1] == b[1]
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=1e-5)
    # best first
    assert torch.equal(det.scores, det.scores.sort(descending=True).values)
    assert det.labels.dtype == torch.int64


@pytest.mark.parametrize(("nms_thresh", "topk", "max_det"), [(0.5, 50, 40), (0.3, 1000, 100), (None, 20, 30)])
def test_batched_postprocess_equals_per_image_retinanet_reference(nms_thresh, topk, max_det):
    anchors, num_per_level, scores, deltas = _setup(seed=1)
    image_sizes = torch.tensor([[64, 64], [40, 56], [64, 30]])  # per-image (H, W): each clips differently
    kwargs = dict(score_thresh=0.2, nms_thresh=nms_thresh, topk_candidates=topk, max_detections=max_det)
    dets = batched_postprocess(scores, _decoder(deltas, anchors), num_per_level, image_sizes, **kwargs)
    ref = _reference(scores, deltas, anchors, num_per_level, image_sizes, 0.2, nms_thresh, topk, max_det)
    assert len(dets) == 3
    for i in range(3):
        _assert_same(dets[i], ref[i])
        h, w = image_sizes[i].tolist()
        assert (dets[i].boxes[:, 0::2] <= w).all() and (dets[i].boxes[:, 1::2] <= h).all()
        assert (dets[i].boxes >= 0).all()
    assert all(d.scores.numel() > 0 for d in dets)
    assert max(d.scores.numel() for d in dets) == max_det  # the cap is reached on at least one image
    # clipping by each image's own size: the narrow images really have boxes cut at their borders
    assert (dets[1].boxes[:, 1::2] == 40).any() and (dets[2].boxes[:, 0::2] == 30).any()


def test_batched_postprocess_image_without_detections():
    anchors, num_per_level, scores, deltas = _setup(seed=2)
    scores[1] = scores[1].clamp(max=0.1)  # nothing above the threshold in image 1
    image_sizes = torch.tensor([[64, 64]] * 3)
    dets = batched_postprocess(scores, _decoder(deltas, anchors), num_per_level, image_sizes, 0.2, 0.5, 100, 50)
    ref = _reference(scores, deltas, anchors, num_per_level, image_sizes, 0.2, 0.5, 100, 50)
    assert dets[1].boxes.shape == (0, 4) and dets[1].scores.shape == (0,) and dets[1].labels.shape == (0,)
    for i in (0, 2):
        _assert_same(dets[i], ref[i])
    # and a batch where no image has any detection
    dets = batched_postprocess(scores.clamp(max=0.1), _decoder(deltas, anchors), num_per_level, image_sizes,
                               0.2, 0.5, 100, 50)
    assert [d.boxes.shape for d in dets] == [(0, 4)] * 3


def test_select_topk_shapes_and_values():
    b, k = 2, 3
    num_per_level = [10, 4, 1]
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(b, sum(num_per_level), k, generator=g)
    top_scores, prior_idx, labels = select_topk(scores, num_per_level, score_thresh=0.3, topk_candidates=5)
    n = sum(min(5, r * k) for r in num_per_level)  # 5 + 5 + 3
    assert top_scores.shape == prior_idx.shape == labels.shape == (b, n)
    torch.testing.assert_close(top_scores.clamp(min=0), torch.where(top_scores > 0.3, scores[
        torch.arange(b)[:, None], prior_idx, labels], torch.zeros(())))
    # per image and level: the kept (above threshold) pairs are exactly the reference top-k
    bounds = [0, 10, 14, 15]
    col = 0
    for level, m in enumerate(num_per_level):
        kk = min(5, m * k)
        for i in range(b):
            pairs = [(scores[i, p, c].item(), p, c) for p in range(bounds[level], bounds[level + 1]) for c in range(k)]
            expected = sorted([x for x in pairs if x[0] > 0.3], reverse=True)[:kk]
            got = [(top_scores[i, col + j].item(), prior_idx[i, col + j].item(), labels[i, col + j].item())
                   for j in range(kk) if top_scores[i, col + j] > 0.3]
            assert sorted(got, reverse=True) == expected
            assert all(bounds[level] <= p < bounds[level + 1] for p in prior_idx[i, col:col + kk].tolist())
        col += kk


@pytest.mark.parametrize("shrink,compact", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("logits", [False, True])
def test_two_stage_selection_keeps_the_top_pairs_of_all(logits, shrink, compact, monkeypatch):
    """A level with more priors than candidates goes through the best-prior-first stage; its result must be
    the top-k over all (prior, class) pairs, also when a prior holds several of the best pairs, also
    when the priors taken shrink to those above the threshold (`raw_thresh`, the CPU path), and also when
    the pairs are compacted above the k-th best prior's maximum instead of top-k'd (long rows on CPU)."""
    import cvzoo.detection.postprocess as post

    monkeypatch.setattr(post, "COMPACT_MIN_PAIRS", 0 if compact else 2**62)
    b, k, num_per_level, topk, thresh = 3, 6, [200, 30, 3], 25, 0.6
    g = torch.Generator().manual_seed(7)
    scores = torch.rand(b, sum(num_per_level), k, generator=g) * 0.7  # 60% of the priors above 0.6
    scores[0, 5] = 0.999  # one prior holding 6 of the best pairs of image 0
    scores[1] = scores[1].clamp(max=0.5)  # an image with nothing above the threshold
    raw, fn = (torch.logit(scores), torch.sigmoid) if logits else (scores, None)
    raw_thresh = (math.log(thresh / (1 - thresh)) if logits else thresh) if shrink else None
    top_scores, prior_idx, labels = select_topk(raw, num_per_level, thresh, topk, fn, raw_thresh)
    if shrink:  # fewer columns: only as many priors a level as some image has above the threshold
        assert top_scores.shape[1] < sum(min(topk, n * k) for n in num_per_level)
    got = sorted((i, p, c) for i, p, c in zip(torch.arange(b)[:, None].expand_as(labels).reshape(-1).tolist(),
                                              prior_idx.reshape(-1).tolist(), labels.reshape(-1).tolist())
                 if scores[i, p, c] > thresh)
    assert (top_scores > thresh).sum() == len(got)
    expected, start = [], 0
    for n in num_per_level:
        flat = scores[:, start:start + n].reshape(b, -1)
        values, idx = flat.topk(min(topk, n * k), dim=1)
        expected += [(i, start + j // k, j % k) for i in range(b) for v, j in zip(values[i].tolist(), idx[i].tolist())
                     if v > thresh]
        start += n
    assert got == sorted(expected)
    assert sum(1 for i, p, _ in got if (i, p) == (0, 5)) == k
    assert all(i != 1 for i, *_ in got)


@pytest.mark.parametrize("logits", [False, True])
def test_compacted_selection_with_more_ties_at_the_cut_than_candidates(logits, monkeypatch):
    """Many pairs share the k-th best prior's maximum: more pairs pass the compaction's cut than there are
    candidates, and the top-k that follows must still return k pairs of the reference's values."""
    import cvzoo.detection.postprocess as post

    monkeypatch.setattr(post, "COMPACT_MIN_PAIRS", 0)
    b, k, n, topk, thresh = 2, 5, 120, 30, 0.2
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(b, n, k, generator=g) * 0.5
    scores[:, :60] = 0.75  # 60 priors x 5 classes tie at the cut
    scores[0, 60:] = 0.9  # image 0: its best 300 pairs are all 0.9, on priors 60-119
    raw, fn = (torch.logit(scores), torch.sigmoid) if logits else (scores, None)
    raw_thresh = math.log(thresh / (1 - thresh)) if logits else thresh
    top_scores, prior_idx, labels = select_topk(raw, [n], thresh, topk, fn, raw_thresh)
    assert top_scores.shape == (b, topk)
    expected = scores.reshape(b, -1).topk(topk, dim=1).values
    torch.testing.assert_close(top_scores.sort(dim=1).values, expected.sort(dim=1).values)
    torch.testing.assert_close(scores[torch.arange(b)[:, None], prior_idx, labels], top_scores)


def test_screening_against_kept_boxes_decides_as_torchvision_nms():
    """`_overlaps_kept` must suppress exactly the candidates torchvision's nms would suppress given the kept
    boxes of their group, including IoU exactly at the threshold (integer boxes) and groups with none kept."""
    from torchvision.ops import nms

    from cvzoo.detection.postprocess import _overlaps_kept

    g = torch.Generator().manual_seed(4)
    n = 400
    xy = torch.randint(0, 40, (n, 2), generator=g).float()
    boxes = torch.cat([xy, xy + torch.randint(1, 12, (n, 2), generator=g).float()], dim=1)
    # IoU exactly 3/10 and 1/2: 0.3 is not a float32, and torchvision compares the float32 IoU with it as a double
    boxes[:4] = torch.tensor([[50.0, 50, 53, 51], [60, 60, 62, 62], [70, 70, 74, 74], [80, 80, 82, 84]])
    boxes[150:154] = torch.tensor([[50.0, 50, 60, 51], [60, 60, 62, 64], [70, 70, 74, 78], [80, 80, 84, 84]])
    groups = torch.randint(0, 7, (n,), generator=g)
    groups[150:154] = groups[:4]
    kept = torch.arange(0, 150)
    kept = kept[groups[kept] != 6]  # group 6 has candidates but no kept box
    candidates = torch.arange(150, n)
    for threshold in (0.3, 0.5):
        got = _overlaps_kept(boxes, groups, kept, candidates, threshold)
        expected = torch.tensor([any(nms(boxes[[i, c]], torch.tensor([1.0, 0.0]), threshold).numel() == 1
                                     for i in kept.tolist() if groups[i] == groups[c]) for c in candidates.tolist()])
        assert torch.equal(got, expected)
        assert 0 < int(got.sum()) < len(candidates) and not got[groups[candidates] == 6].any()


def test_nms_that_stops_early_equals_full_nms_over_several_rounds(monkeypatch):
    """Many overlapping candidates and a small max_detections: the early-stopping NMS needs several prefix
    rounds, and its detections must still be the reference's (full per-image NMS, then the best max_det)."""
    import cvzoo.detection.postprocess as post

    g = torch.Generator().manual_seed(5)
    b, r, k, max_det = 4, 600, 3, 40
    centres = torch.rand(b, r, 2, generator=g) * 150
    size = 40 + torch.rand(b, r, 2, generator=g) * 40
    boxes = torch.cat([centres - size / 2, centres + size / 2], dim=-1)
    scores = torch.rand(b, r, k, generator=g)
    scores[2, 25:] *= 0.05  # an image with 75 candidates, exhausted before max_det
    image_sizes = torch.tensor([[256, 256]] * b)
    calls = []
    real = post.batched_nms_once
    monkeypatch.setattr(post, "batched_nms_once", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    dets = batched_postprocess(scores, lambda idx: torch.gather(boxes, 1, idx[..., None].expand(-1, -1, 4)),
                               [r], image_sizes, 0.05, 0.3, r * k, max_det)
    assert len(calls) >= 2  # the first prefix (2 x max_det a image) left some image short
    for i in range(b):
        flat = scores[i].reshape(-1)
        keep = (flat > 0.05).nonzero()[:, 0]
        cand_boxes = boxes[i][keep // k].clamp(0, 256)
        ref = batched_nms(cand_boxes, flat[keep], keep % k, 0.3)[:max_det]
        assert len(dets[i].scores) == len(ref) == (max_det if i != 2 else len(ref))
        torch.testing.assert_close(dets[i].boxes, cand_boxes[ref])
        assert torch.equal(dets[i].labels, (keep % k)[ref])
        assert torch.equal(dets[i].scores, flat[keep][ref])
    assert 0 < len(dets[2].scores) < max_det


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_grouped_nms_equals_torchvision_batched_nms(threshold):
    g = torch.Generator().manual_seed(11)
    n = 3000
    xy = torch.rand(n, 2, generator=g) * 300
    boxes = torch.cat([xy, xy + 5 + torch.rand(n, 2, generator=g) * 80], dim=1)
    scores = torch.rand(n, generator=g)
    groups = torch.randint(0, 40, (n,), generator=g)
    # IoU exactly 3/10 (0.3 is not a float32; torchvision compares the float32 IoU with it as a double)
    boxes[:2], scores[:2] = torch.tensor([[0.0, 0, 3, 1], [0, 0, 10, 1]]), torch.tensor([2.0, 1.0])
    groups[1] = groups[0]
    ref = batched_nms(boxes, scores, groups, threshold)
    got = grouped_nms(boxes, scores, groups, threshold)
    assert torch.equal(got.sort().values, ref.sort().values)
    assert torch.all(scores[got][1:] <= scores[got][:-1])  # best first
    assert grouped_nms(boxes, scores, groups, threshold, max_elements=10) is None  # over budget: caller falls back


def _centerness_case():
    anchors, num_per_level, _, deltas = _setup(seed=3)
    g = torch.Generator().manual_seed(7)
    cls_logits = torch.randn(3, anchors.shape[0], 4, generator=g) * 2 - 1
    ctr_logits = torch.randn(3, anchors.shape[0], generator=g)
    scores = torch.sqrt(torch.sigmoid(cls_logits) * torch.sigmoid(ctr_logits)[..., None])  # the materialised scores
    return anchors, num_per_level, deltas, cls_logits, ctr_logits, scores


def test_prior_logits_detections_equal_the_reference_on_materialised_scores():
    """FCOS/ATSS scoring from logits (`prior_logits`, CPU path with the threshold shrink): the same detections
    as the per-image reference run on sqrt(sigmoid(class) * sigmoid(centre-ness))."""
    anchors, num_per_level, deltas, cls_logits, ctr_logits, scores = _centerness_case()
    image_sizes = torch.tensor([[64, 64]] * 3)
    dets = batched_postprocess(cls_logits, _decoder(deltas, anchors), num_per_level, image_sizes, 0.3, 0.5, 40, 30,
                               prior_logits=ctr_logits)
    ref = _reference(scores, deltas, anchors, num_per_level, image_sizes, 0.3, 0.5, 40, 30)
    assert all(d.scores.numel() > 0 for d in dets)
    for i in range(3):
        _assert_same(dets[i], ref[i])


def test_prior_logits_select_the_same_pairs_without_the_threshold_shrink():
    """The fixed-shape path (no `raw_thresh`, as on CUDA) picks the same (prior, class) pairs with the same
    scores as a top-k over the materialised scores."""
    _, num_per_level, _, cls_logits, ctr_logits, scores = _centerness_case()
    top, idx, labels = select_topk(cls_logits, num_per_level, 0.3, 40, prior_logits=ctr_logits)
    ref_top, ref_idx, ref_labels = select_topk(scores, num_per_level, 0.3, 40)
    kept = ref_top > 0
    assert torch.equal(top > 0, kept) and kept.sum() > 0
    for i in range(3):
        ours = sorted(zip(idx[i][kept[i]].tolist(), labels[i][kept[i]].tolist(), top[i][kept[i]].tolist()))
        theirs = sorted(zip(ref_idx[i][kept[i]].tolist(), ref_labels[i][kept[i]].tolist(),
                            ref_top[i][kept[i]].tolist()))
        assert [o[:2] for o in ours] == [t[:2] for t in theirs]
        torch.testing.assert_close(torch.tensor([o[2] for o in ours]), torch.tensor([t[2] for t in theirs]))
