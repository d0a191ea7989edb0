"""cvzoo.detection.roi_targets against torchvision's roi_heads functions (project_masks_on_boxes,
paste_masks_in_image, keypoints_to_heatmap, heatmaps_to_keypoints), which loop over images or RoIs, and the
separable 1-D weights against torch.nn.functional.interpolate itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection import roi_heads as tv
from torchvision.ops import roi_align

from cvzoo.detection import roi_targets
from cvzoo.detection.roi_targets import (
    _cubic_weights,
    _linear_weights,
    heatmaps_to_keypoints,
    keypoint_targets,
    mask_targets,
    paste_masks,
)

RESIZES = [(1, 5), (5, 1), (3, 3), (7, 13), (13, 7), (28, 100), (56, 23), (30, 31), (2, 64)]


def _boxes(n: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """(n, 4) xyxy: log-uniform sizes from 0.2 px to 1.5x the image, centres up to a quarter of the image
    outside it, so boxes cross every border, exceed the image and shrink under one pixel."""
    size = torch.tensor([w, h], dtype=torch.float32)
    lo, hi = torch.log(torch.tensor(0.2)), torch.log(size * 1.5)
    wh = torch.exp(lo + torch.rand(n, 2, generator=g) * (hi - lo))  # (n, 2)
    centre = (torch.rand(n, 2, generator=g) * 1.5 - 0.25) * size
    return torch.cat([centre - wh / 2, centre + wh / 2], dim=1)


@pytest.mark.parametrize("in_size,out_size", RESIZES)
def test_linear_weights_match_interpolate(in_size, out_size):
    g = torch.Generator().manual_seed(in_size * 100 + out_size)
    x = torch.randn(2, in_size, in_size + 2, generator=g)
    oh, ow = out_size, out_size + 3
    wy = _linear_weights(in_size, torch.tensor([oh, oh]), torch.arange(oh).expand(2, oh), torch.float32)
    wx = _linear_weights(in_size + 2, torch.tensor([ow, ow]), torch.arange(ow).expand(2, ow), torch.float32)
    ref = F.interpolate(x[:, None], size=(oh, ow), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(wy @ x @ wx.transpose(1, 2), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("in_size,out_size", RESIZES)
def test_cubic_weights_match_interpolate(in_size, out_size):
    g = torch.Generator().manual_seed(in_size * 100 + out_size)
    x = torch.randn(2, in_size, in_size + 2, generator=g)
    oh, ow = out_size, out_size + 3
    # padded rows past a smaller size must not change the rows inside it
    wy = _cubic_weights(in_size, torch.tensor([oh, oh]), oh + 2, torch.float32)[:, :oh]
    wx = _cubic_weights(in_size + 2, torch.tensor([ow, ow]), ow, torch.float32)
    ref = F.interpolate(x[:, None], size=(oh, ow), mode="bicubic", align_corners=False)[:, 0]
    torch.testing.assert_close(wy @ x @ wx.transpose(1, 2), ref, atol=1e-5, rtol=0)


def test_cubic_weights_rows_follow_each_rois_own_size():
    x = torch.randn(9, 11, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([4, 17, 9])
    wy = _cubic_weights(9, sizes, 17, torch.float32)
    for i, s in enumerate(sizes.tolist()):
        ref = F.interpolate(x[None, None], size=(s, 11), mode="bicubic", align_corners=False)[0, 0]
        torch.testing.assert_close(wy[i, :s] @ x, ref, atol=1e-5, rtol=0)


def _mask_batch(b, m, s, h, w, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(b, m, h, w, generator=g) > 0.5
    masks = masks if dtype == torch.bool else masks.to(dtype) * torch.rand(b, m, h, w, generator=g)
    boxes = torch.stack([_boxes(s, h, w, g) for _ in range(b)])  # (B, S, 4)
    matched = torch.randint(0, max(m, 1), (b, s), generator=g)
    return masks, matched, boxes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_mask_targets_matches_torchvision(dtype):
    masks, matched, boxes = _mask_batch(3, 4, 9, 23, 31, seed=1, dtype=dtype)
    out = mask_targets(masks, matched, boxes, 14)
    assert out.shape == (3, 9, 14, 14) and out.dtype == torch.float32
    for i in range(3):
        ref = tv.project_masks_on_boxes(masks[i], boxes[i], matched[i], 14)
        torch.testing.assert_close(out[i], ref, atol=1e-6, rtol=0)


def test_mask_targets_rectangular_size_and_garbage_indices():
    masks, matched, boxes = _mask_batch(2, 3, 4, 20, 17, seed=2)
    matched[0, 0], matched[1, 2] = -1, 99  # rows the caller masks out later: clamped, never an error
    out = mask_targets(masks, matched, boxes, (7, 12))
    assert out.shape == (2, 4, 7, 12)
    for i in range(2):
        idx = matched[i].clamp(0, 2).float()
        ref = roi_align(masks[i][:, None], torch.cat([idx[:, None], boxes[i]], 1), (7, 12), 1.0)[:, 0]
        torch.testing.assert_close(out[i], ref, atol=1e-6, rtol=0)


def test_mask_targets_empty():
    masks, matched, boxes = _mask_batch(2, 0, 5, 10, 10, seed=3)  # no objects in the batch
    assert torch.equal(mask_targets(masks, matched, boxes, 6), torch.zeros(2, 5, 6, 6))
    masks, matched, boxes = _mask_batch(2, 3, 0, 10, 10, seed=3)  # no RoIs
    assert mask_targets(masks, matched, boxes, 6).shape == (2, 0, 6, 6)


def _paste_case(n, mh, mw, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(n, mh, mw, generator=g)
    boxes = _boxes(n, h, w, g)
    # torchvision's slicing raises for integer boxes wholly outside the image; keep those out of the comparison
    boxes[:, :2] = torch.minimum(boxes[:, :2], torch.tensor([w - 1.0, h - 1.0]))
    boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2].clamp(min=0.2) + 0.3)
    return masks, boxes


@pytest.mark.parametrize("padding", [0, 1, 2])
@pytest.mark.parametrize("mask_shape", [(28, 28), (14, 21)])  # non-square: torchvision scales by Mw on both axes
def test_paste_masks_matches_torchvision(padding, mask_shape):
    h, w = 37, 53
    masks, boxes = _paste_case(16, *mask_shape, h, w, seed=padding)
    out = paste_masks(masks, boxes, (h, w), padding)
    ref = tv.paste_masks_in_image(masks[:, None], boxes, (h, w), padding)[:, 0]
    assert out.shape == (16, h, w)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_paste_masks_chunks_and_edge_boxes(monkeypatch):
    h, w = 30, 40
    masks, boxes = _paste_case(6, 28, 28, h, w, seed=5)
    boxes[0] = torch.tensor([0.0, 0.0, w - 1.0, h - 1.0])  # the whole image
    boxes[1] = torch.tensor([-10.0, -5.0, w + 10.0, h + 5.0])  # beyond it on every side
    boxes[2] = torch.tensor([12.3, 7.6, 12.4, 7.9])  # under a pixel
    boxes[3] = torch.tensor([5.0, 5.0, 4.0, 6.0])  # degenerate (x2 < x1)
    ref = tv.paste_masks_in_image(masks[:, None], boxes, (h, w), 1)[:, 0]
    monkeypatch.setattr(roi_targets, "CHUNK_ELEMENTS", 2 * h * w)  # 1 mask a chunk: chunks must not matter
    torch.testing.assert_close(paste_masks(masks, boxes, (h, w)), ref, atol=1e-5, rtol=0)


def test_paste_masks_outside_image_and_empty():
    masks = torch.rand(3, 28, 28, generator=torch.Generator().manual_seed(6))
    # wholly outside the image (left, below, right): torchvision's slicing raises on such boxes; zeros here
    boxes = torch.tensor([[-50.0, 10.0, -20.0, 20.0], [10.0, 60.0, 20.0, 70.0], [105.0, 10.0, 125.0, 20.0]])
    assert torch.equal(paste_masks(masks, boxes, (50, 100)), torch.zeros(3, 50, 100))
    assert paste_masks(torch.zeros(0, 28, 28), torch.zeros(0, 4), (50, 100)).shape == (0, 50, 100)


def test_keypoint_targets_matches_torchvision():
    g = torch.Generator().manual_seed(7)
    b, s, k, size = 3, 8, 17, 56
    boxes = torch.stack([_boxes(s, 60, 80, g) for _ in range(b)])  # (B, S, 4), some under a pixel
    lo, hi = boxes[..., None, :2], boxes[..., None, 2:]
    xy = lo + (hi - lo) * (torch.rand(b, s, k, 2, generator=g) * 1.4 - 0.2)  # some outside their box
    xy[:, :, 0] = lo[:, :, 0]  # exactly on the left/top edge: cell 0
    xy[:, :, 1] = hi[:, :, 0]  # exactly on the right/bottom edge: last cell (torchvision's special case)
    xy[:, :, 2, 0] = hi[:, :, 0, 0]  # right edge only
    vis = torch.randint(0, 3, (b, s, k, 1), generator=g).float()
    keypoints = torch.cat([xy, vis], dim=-1)
    indices, valid = keypoint_targets(keypoints, boxes, size)
    ref_idx, ref_valid = tv.keypoints_to_heatmap(keypoints.reshape(b * s, k, 3), boxes.reshape(b * s, 4), size)
    assert indices.dtype == torch.int64 and valid.dtype == torch.bool
    assert torch.equal(indices.reshape(b * s, k), ref_idx)
    assert torch.equal(valid.reshape(b * s, k), ref_valid.bool())
    assert 0 < valid.sum() < valid.numel()  # the case mixes valid and invalid keypoints


def test_keypoint_targets_empty():
    indices, valid = keypoint_targets(torch.zeros(2, 0, 17, 3), torch.zeros(2, 0, 4), 56)
    assert indices.shape == valid.shape == (2, 0, 17)


def _heatmap_case(n, k, hm, seed):
    g = torch.Generator().manual_seed(seed)
    maps = torch.randn(n, k, hm, hm, generator=g)
    boxes = _boxes(n, 60, 90, g)
    return maps, boxes


def _assert_keypoints_match(maps, boxes):
    kp, scores = heatmaps_to_keypoints(maps, boxes)
    ref_kp, ref_scores = tv.heatmaps_to_keypoints(maps, boxes)
    assert kp.shape == ref_kp.shape and scores.shape == ref_scores.shape
    torch.testing.assert_close(kp, ref_kp, atol=1e-3, rtol=0)
    torch.testing.assert_close(scores, ref_scores, atol=1e-4, rtol=0)


def test_heatmaps_to_keypoints_matches_torchvision():
    maps, boxes = _heatmap_case(12, 5, 14, seed=8)  # RoIs from under a pixel (clamped to 1) to 135 px
    _assert_keypoints_match(maps, boxes)


def test_heatmaps_to_keypoints_chunks(monkeypatch):
    maps, boxes = _heatmap_case(7, 3, 10, seed=9)
    boxes[0] = torch.tensor([3.2, 4.1, 3.5, 4.3])  # under a pixel: a 1 x 1 map, pure downsampling
    boxes[1] = torch.tensor([0.0, 0.0, 7.0, 23.5])  # narrow and tall
    monkeypatch.setattr(roi_targets, "CHUNK_ELEMENTS", 1)  # one RoI a chunk, each with its own padded grid
    _assert_keypoints_match(maps, boxes)


def test_heatmaps_to_keypoints_empty():
    kp, scores = heatmaps_to_keypoints(torch.zeros(0, 17, 56, 56), torch.zeros(0, 4))
    assert kp.shape == (0, 17, 3) and scores.shape == (0, 17)


def test_loss_side_functions_compile():
    masks, matched, boxes = _mask_batch(2, 3, 4, 16, 16, seed=10)
    fn = torch.compile(mask_targets, backend="eager", fullgraph=True)
    torch.testing.assert_close(fn(masks, matched, boxes, 7), mask_targets(masks, matched, boxes, 7))
    keypoints = torch.rand(2, 4, 5, 3) * 16
    fn = torch.compile(keypoint_targets, backend="eager", fullgraph=True)
    for a, r in zip(fn(keypoints, boxes, 8), keypoint_targets(keypoints, boxes, 8)):
        assert torch.equal(a, r)


@pytest.mark.parametrize("call,match", [
    (lambda: mask_targets(torch.zeros(2, 3, 8, 8), torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 5, 4), 7),
     "boxes must be"),
    (lambda: mask_targets(torch.zeros(2, 3, 8, 8), torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 4, 4), 7),
     "matched must be"),
    (lambda: mask_targets(torch.zeros(2, 3, 8, 8), torch.zeros(2, 4), torch.zeros(2, 4, 4), 7), "matched must be"),
    (lambda: mask_targets(torch.zeros(3, 8, 8), torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, 4), 7),
     "gt_masks must be"),
    (lambda: mask_targets(torch.zeros(2, 3, 8, 8), torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, 4), 0),
     "size must be"),
    (lambda: paste_masks(torch.zeros(3, 28, 28), torch.zeros(2, 4), (10, 10)), "boxes must be"),
    (lambda: paste_masks(torch.zeros(3, 1, 28, 28), torch.zeros(3, 4), (10, 10)), "masks must be"),
    (lambda: paste_masks(torch.zeros(3, 28, 28), torch.zeros(3, 4), (10,)), "image_size must be"),
    (lambda: paste_masks(torch.zeros(3, 28, 28), torch.zeros(3, 4), (10, 10), padding=-1), "padding must be"),
    (lambda: keypoint_targets(torch.zeros(2, 4, 17, 2), torch.zeros(2, 4, 4), 56), "keypoints must be"),
    (lambda: keypoint_targets(torch.zeros(2, 4, 17, 3), torch.zeros(8, 4), 56), "boxes must be"),
    (lambda: keypoint_targets(torch.zeros(2, 4, 17, 3), torch.zeros(2, 4, 4), 0), "heatmap_size must be"),
    (lambda: heatmaps_to_keypoints(torch.zeros(3, 17, 56), torch.zeros(3, 4)), "maps must be"),
    (lambda: heatmaps_to_keypoints(torch.zeros(3, 17, 56, 56), torch.zeros(2, 4)), "boxes must be"),
])
def test_boundary_errors_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
