"""cvzoo.detection.boxes against torchvision.ops, image by image."""

from __future__ import annotations

import itertools

import pytest
import torch
from torchvision.ops import box_convert as tv_box_convert
from torchvision.ops import box_iou, clip_boxes_to_image, generalized_box_iou

from cvzoo.detection.boxes import (
    FORMATS,
    box_area,
    box_convert,
    clip_boxes,
    elementwise_giou,
    ltrb_giou,
    pairwise_giou,
    pairwise_iou,
    valid_boxes,
)


def _boxes(*shape: int, size: float = 100.0, seed: int = 0) -> torch.Tensor:
    """Random valid xyxy boxes (*shape, 4) inside a size x size image, some overlapping, some not."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(*shape, 2, generator=g) * size * 0.7
    wh = 1.0 + torch.rand(*shape, 2, generator=g) * size * 0.5
    return torch.cat([xy, xy + wh], dim=-1)


@pytest.mark.parametrize(("ours", "ref"), [(pairwise_iou, box_iou), (pairwise_giou, generalized_box_iou)])
def test_pairwise_batched_equals_torchvision_per_image(ours, ref):
    a, b = _boxes(3, 5, seed=1), _boxes(3, 7, seed=2)
    out = ours(a, b)
    assert out.shape == (3, 5, 7)
    expected = torch.stack([ref(a[i], b[i]) for i in range(3)])
    torch.testing.assert_close(out, expected)
    # the values must not be trivial: some pairs overlap, some do not
    iou = torch.stack([box_iou(a[i], b[i]) for i in range(3)])
    assert (iou > 0).any() and (iou == 0).any()


@pytest.mark.parametrize(("ours", "ref"), [(pairwise_iou, box_iou), (pairwise_giou, generalized_box_iou)])
def test_pairwise_unbatched_and_shared_second_argument(ours, ref):
    a, b = _boxes(6, seed=3), _boxes(4, seed=4)
    torch.testing.assert_close(ours(a, b), ref(a, b))
    batch = _boxes(2, 6, seed=5)
    out = ours(batch, b)  # (B, N, 4) x (M, 4): b shared by every image
    assert out.shape == (2, 6, 4)
    torch.testing.assert_close(out, torch.stack([ref(batch[i], b) for i in range(2)]))


def test_pairwise_iou_known_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0]])
    torch.testing.assert_close(pairwise_iou(a, b), torch.tensor([[1 / 7, 1.0, 0.0]]))
    # GIoU of the disjoint pair: 0 - (hull 36 - union 5) / 36
    torch.testing.assert_close(pairwise_giou(a, b)[0, 2], torch.tensor(-31 / 36))


@pytest.mark.parametrize(("in_fmt", "out_fmt"), list(itertools.product(FORMATS, FORMATS)))
def test_box_convert_equals_torchvision_and_round_trips(in_fmt, out_fmt):
    boxes = tv_box_convert(_boxes(2, 5, seed=6).reshape(-1, 4), "xyxy", in_fmt).reshape(2, 5, 4)
    out = box_convert(boxes, in_fmt, out_fmt)
    assert out.shape == (2, 5, 4)
    torch.testing.assert_close(out.reshape(-1, 4), tv_box_convert(boxes.reshape(-1, 4), in_fmt, out_fmt))
    torch.testing.assert_close(box_convert(out, out_fmt, in_fmt), boxes)


def test_box_convert_known_values():
    xyxy = torch.tensor([[1.0, 2.0, 5.0, 10.0]])
    torch.testing.assert_close(box_convert(xyxy, "xyxy", "xywh"), torch.tensor([[1.0, 2.0, 4.0, 8.0]]))
    torch.testing.assert_close(box_convert(xyxy, "xyxy", "cxcywh"), torch.tensor([[3.0, 6.0, 4.0, 8.0]]))


@pytest.mark.parametrize(("in_fmt", "out_fmt"), [("xyxy", "xyxyx"), ("XYWH", "xyxy"), ("cxcywh", "")])
def test_box_convert_bad_format_raises(in_fmt, out_fmt):
    with pytest.raises(ValueError, match="fmt"):
        box_convert(_boxes(3), in_fmt, out_fmt)


def test_clip_boxes_fixed_size_equals_torchvision():
    boxes = _boxes(2, 6, size=100.0, seed=7) * 1.6 - 30.0  # many cross the borders on all sides
    out = clip_boxes(boxes, (70, 90))
    expected = clip_boxes_to_image(boxes.reshape(-1, 4), (70, 90)).reshape(2, 6, 4)
    torch.testing.assert_close(out, expected)
    assert not torch.equal(out, boxes)


def test_clip_boxes_per_image_size_tensor():
    boxes = _boxes(3, 6, size=100.0, seed=8) * 1.6 - 30.0
    sizes = torch.tensor([[50, 90], [100, 40], [64, 64]])  # (B, 2) of (H, W)
    out = clip_boxes(boxes, sizes)
    expected = torch.stack([clip_boxes_to_image(boxes[i], tuple(sizes[i].tolist())) for i in range(3)])
    torch.testing.assert_close(out, expected)
    # each image is clipped to its own size, not the first one's
    assert not torch.equal(out[1], clip_boxes(boxes[1], (50, 90)))


def test_elementwise_giou_equals_diagonal_of_torchvision():
    a, b = _boxes(2, 8, seed=9), _boxes(2, 8, seed=10)
    out = elementwise_giou(a, b)
    assert out.shape == (2, 8)
    expected = torch.stack([generalized_box_iou(a[i], b[i]).diagonal() for i in range(2)])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    assert (out < 0).any() and (out > 0).any()


def test_box_area_and_valid_boxes():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 3.0], [1.0, 1.0, 1.0, 4.0], [3.0, 0.0, 1.0, 1.0],
                          [0.0, 0.0, float("nan"), 1.0], [0.0, 0.0, float("inf"), 1.0]])
    torch.testing.assert_close(box_area(boxes[:3]), torch.tensor([6.0, 0.0, 0.0]))
    assert valid_boxes(boxes).tolist() == [True, False, False, False, False]


def test_ltrb_giou_equals_torchvision_giou_of_the_decoded_boxes():
    """Distances from common points, scaled by a per-point stride: GIoU of the decoded pixel boxes."""
    g = torch.Generator().manual_seed(3)
    points = torch.rand(200, 2, generator=g) * 100
    strides = torch.tensor([8.0, 16.0, 32.0])[torch.randint(0, 3, (200,), generator=g)]
    pred = torch.rand(200, 4, generator=g) * 3  # in strides, >= 0 (the head's ReLU)
    pred[:5] = 0  # degenerate predictions (all-zero distances) stay finite
    target = torch.rand(200, 4, generator=g) * 3 + 0.05

    def decode(d):  # in float64: float32 pixel coordinates would round at 1e-5
        d = d.double() * strides.double()[:, None]
        return torch.cat([points.double() - d[:, :2], points.double() + d[:, 2:]], dim=1)

    expected = torch.diagonal(generalized_box_iou(decode(pred), decode(target)))
    torch.testing.assert_close(ltrb_giou(pred.double(), target.double()), expected, rtol=1e-6, atol=1e-7)
