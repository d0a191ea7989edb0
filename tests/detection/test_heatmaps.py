"""cvzoo.detection.heatmaps against a per-box loop of CenterNet's draw_umich_gaussian and CornerNet's radius."""

from __future__ import annotations

import math

import pytest
import torch

from cvzoo.detection.heatmaps import CenterNetEncoder, gaussian_radius
from cvzoo.detection.structures import TargetBatch


def _cornernet_radius(height: float, width: float, min_overlap: float = 0.7) -> float:
    """CornerNet / CenterNet `gaussian_radius(det_size, min_overlap)`, scalar Python."""
    a1, b1 = 1, height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1**2 - 4 * a1 * c1)) / 2
    a2, b2 = 4, 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + math.sqrt(b2**2 - 4 * a2 * c2)) / 2
    a3, b3 = 4 * min_overlap, -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + math.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def _reference(targets: TargetBatch, num_classes: int, stride: int, size: tuple[int, int], min_overlap: float = 0.7):
    """One box at a time, as CenterNet's draw_umich_gaussian: max over boxes, first box owns a shared cell."""
    h, w = size
    b, m = targets.labels.shape
    heat = torch.zeros(b, num_classes, h, w, dtype=torch.float64)
    sizes = torch.zeros(b, h * w, 2, dtype=torch.float64)
    offsets = torch.zeros(b, h * w, 2, dtype=torch.float64)
    mask = torch.zeros(b, h * w)
    for i in range(b):
        for j in range(m):
            label = int(targets.labels[i, j])
            if label < 0:
                continue
            x1, y1, x2, y2 = (v / stride for v in targets.boxes[i, j].double().tolist())
            bw, bh = x2 - x1, y2 - y1
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            ix, iy = min(max(math.floor(cx), 0), w - 1), min(max(math.floor(cy), 0), h - 1)
            r = max(0, int(_cornernet_radius(bh, bw, min_overlap)))
            sigma = (2 * r + 1) / 6
            for y in range(max(0, iy - r), min(h, iy + r + 1)):
                for x in range(max(0, ix - r), min(w, ix + r + 1)):
                    g = math.exp(-((x - ix) ** 2 + (y - iy) ** 2) / (2 * sigma * sigma))
                    heat[i, label, y, x] = max(heat[i, label, y, x].item(), g)
            cell = iy * w + ix
            if mask[i, cell] == 0:
                sizes[i, cell] = torch.tensor([bw, bh], dtype=torch.float64)
                offsets[i, cell] = torch.tensor([cx - ix, cy - iy], dtype=torch.float64)
                mask[i, cell] = 1.0
    return heat.reshape(b, num_classes, h * w).transpose(1, 2).float(), sizes.float(), offsets.float(), mask


def _random_targets(counts, image_hw, num_classes, seed):
    g = torch.Generator().manual_seed(seed)
    ih, iw = image_hw
    targets = []
    for n in counts:
        wh = 3.0 + torch.rand(n, 2, generator=g) * torch.tensor([iw * 0.6, ih * 0.6])
        xy = torch.rand(n, 2, generator=g) * (torch.tensor([iw, ih]) - wh)
        targets.append({"boxes": torch.cat([xy, xy + wh], -1), "labels": torch.randint(0, num_classes, (n,),
                                                                                           generator=g)})
    return TargetBatch.from_list(targets, num_images=len(counts), num_classes=num_classes)


def _assert_matches_reference(out, ref):
    heat, sizes, offsets, mask = ref
    torch.testing.assert_close(out.heatmap, heat, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.sizes, sizes, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.offsets, offsets, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.mask, mask)


@pytest.mark.parametrize("stride", [4, 8])
def test_encoder_equals_per_box_reference(stride):
    image_hw, k = (64, 96), 3
    size = (image_hw[0] // stride, image_hw[1] // stride)
    targets = _random_targets([6, 0, 9], image_hw, k, seed=stride)
    out = CenterNetEncoder(k, stride)(targets, size)
    hw = size[0] * size[1]
    assert out.heatmap.shape == (3, hw, k) and out.sizes.shape == (3, hw, 2)
    assert out.offsets.shape == (3, hw, 2) and out.mask.shape == (3, hw)
    _assert_matches_reference(out, _reference(targets, k, stride, size))
    assert (out.heatmap[1] == 0).all() and (out.mask[1] == 0).all()
    # non-trivial: Gaussians wider than one cell, and values strictly between 0 and 1
    assert ((out.heatmap > 0) & (out.heatmap < 1)).any()
    # each box's centre cell holds exactly 1 in its class map
    for i in (0, 2):
        for j in range(int(targets.valid[i].sum())):
            c = ((targets.boxes[i, j, :2] + targets.boxes[i, j, 2:]) / 2 / stride).floor().long()
            assert out.heatmap[i, c[1] * size[1] + c[0], targets.labels[i, j]] == 1.0


def test_encoder_shared_centre_lowest_index_wins():
    stride, size = 4, (8, 8)
    # boxes 1 and 2 share the centre cell (2, 2); box 1 comes first. Box 0 is elsewhere, another class.
    boxes = torch.tensor([[16.0, 16.0, 30.0, 28.0], [4.0, 4.0, 16.0, 16.0], [8.5, 9.0, 11.5, 11.0]])
    for order in ([0, 1, 2], [0, 2, 1]):
        tb = TargetBatch.from_list([{"boxes": boxes[order], "labels": torch.tensor([1, 0, 0])}],
                                   num_images=1, num_classes=2)
        out = CenterNetEncoder(2, stride)(tb, size)
        _assert_matches_reference(out, _reference(tb, 2, stride, size))
        owner = boxes[order][1] / stride  # lowest-index box at the shared cell
        torch.testing.assert_close(out.sizes[0, 2 * 8 + 2], owner[2:] - owner[:2])
        assert out.mask.sum() == 2


def test_encoder_padding_rows_add_nothing():
    k, stride, size = 2, 4, (10, 12)
    real = _random_targets([3], (40, 48), k, seed=5)
    junk = torch.tensor([[[0.0, 0.0, 40.0, 40.0], [5.0, 5.0, 9.0, 9.0]]])  # padding rows with non-zero boxes
    padded = TargetBatch(torch.cat([real.boxes, junk], 1), torch.cat([real.labels, torch.full((1, 2), -1)], 1))
    enc = CenterNetEncoder(k, stride)
    a, b = enc(real, size), enc(padded, size)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_encoder_clamps_centres_to_grid():
    tb = TargetBatch.from_list([{"boxes": torch.tensor([[20.0, 20.0, 40.0, 40.0]]), "labels": torch.tensor([0])}],
                               num_images=1, num_classes=1)
    out = CenterNetEncoder(1, 4)(tb, (5, 6))  # centre (30, 30) / 4 = cell (7, 7), outside a 5 x 6 grid
    _assert_matches_reference(out, _reference(tb, 1, 4, (5, 6)))
    assert out.mask[0, 4 * 6 + 5] == 1 and out.heatmap[0, 4 * 6 + 5, 0] == 1


def test_encoder_rejects_bad_arguments():
    with pytest.raises(ValueError, match="CenterNetEncoder"):
        CenterNetEncoder(0, 4)
    with pytest.raises(ValueError, match="CenterNetEncoder"):
        CenterNetEncoder(3, 4, min_overlap=1.0)


@pytest.mark.parametrize("min_overlap", [0.3, 0.7, 0.9])
def test_gaussian_radius_equals_cornernet(min_overlap):
    g = torch.Generator().manual_seed(0)
    w = 0.5 + torch.rand(20, generator=g, dtype=torch.float64) * 100
    h = 0.5 + torch.rand(20, generator=g, dtype=torch.float64) * 100
    out = gaussian_radius(w, h, min_overlap)
    expected = torch.tensor([_cornernet_radius(hh, ww, min_overlap) for ww, hh in zip(w.tolist(), h.tolist())],
                            dtype=torch.float64)
    torch.testing.assert_close(out, expected)
