"""cvzoo.detection.roi against torchvision: MultiScaleRoIAlign (per-image box lists) for the pooling, and
BalancedPositiveNegativeSampler's counts for the sampling, plus a binomial check of the sampler's uniformity."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.ops import MultiScaleRoIAlign

from cvzoo.detection.roi import MultiLevelRoIAlign, sample_rois

STRIDES = (4, 8, 16, 32)


def _features(b: int, c: int, h: int, w: int, strides=STRIDES, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, h // s, w // s, generator=g) for s in strides]


def _boxes(b: int, p: int, h: int, w: int, seed: int = 0, valid_p: float = 0.7) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P, 4) boxes inside an h x w image with log-uniform sizes from 4 px to the image size, a random
    valid mask (padding rows interleaved, not only at the end), and NaN in some padding rows."""
    g = torch.Generator().manual_seed(seed)
    size = torch.tensor([w, h], dtype=torch.float32)
    wh = torch.exp(torch.rand(b, p, 2, generator=g) * torch.log(size / 4)) * 4  # (B, P, 2) in [4, size]
    xy = torch.rand(b, p, 2, generator=g) * (size - wh)
    boxes = torch.cat([xy, xy + wh], dim=-1)
    valid = torch.rand(b, p, generator=g) < valid_p
    boxes[~valid & (torch.rand(b, p, generator=g) < 0.5)] = float("nan")  # padding may hold garbage
    return boxes, valid


def _reference(features, boxes, valid, h, w, output_size, sampling_ratio, canonical_scale=224, canonical_level=4):
    names = [str(i) for i in range(len(features))]
    tv = MultiScaleRoIAlign(names, output_size, sampling_ratio, canonical_scale=canonical_scale,
                            canonical_level=canonical_level)
    x = OrderedDict(zip(names, features))
    return tv(x, [boxes[i][valid[i]] for i in range(boxes.shape[0])], [(h, w)] * boxes.shape[0])


# ---------------------------------------------------------------- MultiLevelRoIAlign


@pytest.mark.parametrize(("canonical_scale", "canonical_level", "output_size", "sampling_ratio"),
                         [(224, 4, 7, 2), (56, 4, 5, 0), (64, 3, (3, 4), 1)])
def test_multilevel_roi_align_equals_torchvision(canonical_scale, canonical_level, output_size, sampling_ratio):
    h, w = 256, 320  # multiples of the largest stride: torchvision infers exactly 1/stride
    features = _features(3, 4, h, w)
    boxes, valid = _boxes(3, 40, h, w)
    pool = MultiLevelRoIAlign(output_size=output_size, sampling_ratio=sampling_ratio, strides=STRIDES,
                              canonical_scale=canonical_scale, canonical_level=canonical_level)
    out = pool(features, boxes, valid)
    size = (output_size, output_size) if isinstance(output_size, int) else output_size
    assert out.shape == (3, 40, 4, *size)
    ref = _reference(features, boxes, valid, h, w, output_size, sampling_ratio, canonical_scale, canonical_level)
    torch.testing.assert_close(out[valid], ref, rtol=0, atol=1e-5)
    assert (out[~valid] == 0).all()
    if canonical_scale == 56:  # this configuration spreads the boxes over every level
        assert set(pool.levels(boxes[valid]).tolist()) == {0, 1, 2, 3}


def test_multilevel_roi_align_default_scale_all_levels():
    """Default canonical scale 224: boxes of side ~ 50 ... 500 px cover all four levels, clamped at both ends."""
    h, w = 512, 544
    features = _features(2, 3, h, w, seed=1)
    side = torch.tensor([20.0, 60.0, 130.0, 250.0, 480.0, 500.0])
    boxes = torch.stack([torch.full_like(side, 5.0), torch.full_like(side, 7.0), 5.0 + side, 7.0 + side], dim=-1)
    boxes = torch.stack([boxes, boxes.flip(0)])  # (2, 6, 4)
    valid = torch.ones(2, 6, dtype=torch.bool)
    pool = MultiLevelRoIAlign()
    assert pool.levels(boxes[0]).tolist() == [0, 0, 1, 2, 3, 3]
    ref = _reference(features, boxes, valid, h, w, 7, 2)
    torch.testing.assert_close(pool(features, boxes, valid).flatten(0, 1), ref, rtol=0, atol=1e-5)


def test_multilevel_roi_align_single_level_and_aligned():
    h, w = 64, 96
    features = _features(2, 3, h, w, strides=(8,))
    boxes, valid = _boxes(2, 10, h, w, seed=3)
    out = MultiLevelRoIAlign(strides=(8,), aligned=True)(features, boxes, valid)
    ref = torch.ops.torchvision.roi_align  # the single-level reference is roi_align itself
    rois = torch.cat([torch.arange(2.0).repeat_interleave(10)[:, None], boxes.reshape(-1, 4)], dim=1)[valid.reshape(-1)]
    torch.testing.assert_close(out[valid], ref(features[0], rois, 1 / 8, 7, 7, 2, True), rtol=0, atol=1e-5)


def test_multilevel_roi_align_empty_images():
    h, w = 128, 128
    features = _features(3, 2, h, w)
    boxes, valid = _boxes(3, 8, h, w, seed=4, valid_p=1.0)
    valid[1] = False  # one image without boxes
    pool = MultiLevelRoIAlign()
    out = pool(features, boxes, valid)
    assert (out[1] == 0).all()
    torch.testing.assert_close(out[valid], _reference(features, boxes, valid, h, w, 7, 2), rtol=0, atol=1e-5)
    none = pool(features, boxes, torch.zeros_like(valid))
    assert none.shape == (3, 8, 2, 7, 7) and (none == 0).all()


def test_multilevel_roi_align_compiles_fullgraph():
    h, w = 128, 160
    features = _features(2, 3, h, w)
    boxes, valid = _boxes(2, 12, h, w, seed=5)
    pool = MultiLevelRoIAlign(canonical_scale=32)
    compiled = torch.compile(pool, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(features, boxes, valid), pool(features, boxes, valid), rtol=0, atol=0)
    boxes2, valid2 = _boxes(2, 12, h, w, seed=6)  # same P, other data: no recompile needed, same numbers
    torch.testing.assert_close(compiled(features, boxes2, valid2), pool(features, boxes2, valid2), rtol=0, atol=0)


def test_multilevel_roi_align_gradients_equal_torchvision():
    h, w = 128, 160
    features = [f.requires_grad_() for f in _features(2, 3, h, w)]
    ref_features = [f.detach().clone().requires_grad_() for f in features]
    boxes, valid = _boxes(2, 30, h, w, seed=7)
    pool = MultiLevelRoIAlign(canonical_scale=32)
    out = pool(features, boxes, valid)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(8))
    (out * weight).sum().backward()
    ref = _reference(ref_features, boxes, valid, h, w, 7, 2, canonical_scale=32)
    (ref * weight[valid]).sum().backward()
    for f, r in zip(features, ref_features):
        assert f.grad is not None and torch.isfinite(f.grad).all()
        torch.testing.assert_close(f.grad, r.grad, rtol=0, atol=1e-5)
    assert all(f.grad.abs().sum() > 0 for f in features)  # every level received some box


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"output_size": 0}, "output_size"),
    ({"output_size": (7, 7, 7)}, "output_size"),
    ({"sampling_ratio": 1.5}, "sampling_ratio"),
    ({"strides": ()}, "strides"),
    ({"strides": (4, 12)}, "strides"),
    ({"strides": (4, 16)}, "strides"),
    ({"canonical_scale": 0}, "canonical_scale"),
    ({"canonical_level": 4.5}, "canonical_level"),
])
def test_multilevel_roi_align_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiLevelRoIAlign(**kwargs)


def test_multilevel_roi_align_bad_forward_arguments():
    pool = MultiLevelRoIAlign()
    features = _features(2, 3, 64, 64)
    boxes, valid = _boxes(2, 5, 64, 64)
    with pytest.raises(ValueError, match="features has 3 levels"):
        pool(features[:3], boxes, valid)
    with pytest.raises(ValueError, match="boxes"):
        pool(features, boxes[..., :3], valid)
    with pytest.raises(ValueError, match="valid"):
        pool(features, boxes, valid.long())
    with pytest.raises(ValueError, match=r"features\[2\]"):
        pool([*features[:2], features[2][:1], features[3]], boxes, valid)


# ---------------------------------------------------------------- sample_rois


def _random_labels(b: int, p: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels in {-2, -1, 0..4} with a random foreground rate per image (0 included) and random validity."""
    g = torch.Generator().manual_seed(seed)
    fg_rate = torch.rand(b, 1, generator=g) * 0.5
    fg_rate[0] = 0.0  # an image without foreground
    u = torch.rand(b, p, generator=g)
    labels = torch.where(u < fg_rate, torch.randint(0, 5, (b, p), generator=g), torch.full((b, p), -1))
    labels = torch.where(torch.rand(b, p, generator=g) < 0.1, torch.full((b, p), -2), labels)
    valid = torch.rand(b, p, generator=g) < 0.9
    valid[1, p // 4:] = False  # an image with fewer real rows than S
    return labels, valid


def _check_sample(labels, valid, indices, keep, s, fraction):
    """Counts equal torchvision's sampler's; kept rows are distinct, valid, fg first then bg; padding is index 0."""
    fg = valid & (labels >= 0)
    bg = valid & (labels == -1)
    matched = torch.where(fg, 1, torch.where(bg, 0, -1))  # torchvision's convention: >= 1 pos, 0 neg, -1 ignored
    ref_pos, ref_neg = BalancedPositiveNegativeSampler(s, fraction)(list(matched))
    picked_fg = torch.gather(fg, 1, indices) & keep
    picked_bg = torch.gather(bg, 1, indices) & keep
    assert indices.shape == keep.shape == (labels.shape[0], s) and indices.dtype == torch.int64
    assert (picked_fg | picked_bg == keep).all()  # ignored and invalid rows never sampled
    assert picked_fg.sum(1).tolist() == [int(m.sum()) for m in ref_pos]
    assert picked_bg.sum(1).tolist() == [int(m.sum()) for m in ref_neg]
    n_pos = picked_fg.sum(1, keepdim=True)
    slot = torch.arange(s)
    assert (picked_fg == (slot < n_pos)).all() and (keep == (slot < n_pos + picked_bg.sum(1, keepdim=True))).all()
    assert (indices[~keep] == 0).all()
    for i in range(labels.shape[0]):  # test-side loop only: kept indices are distinct
        kept = indices[i][keep[i]]
        assert kept.unique().numel() == kept.numel()


@pytest.mark.parametrize(("p", "s", "fraction"), [(300, 64, 0.25), (100, 512, 0.25), (50, 16, 0.5), (40, 8, 1.0),
                                                   (40, 8, 0.0), (1, 4, 0.25)])
def test_sample_rois_counts_equal_torchvision(p, s, fraction):
    for seed in range(3):
        labels, valid = _random_labels(6, p, seed)
        indices, keep = sample_rois(labels, valid, s, fraction, generator=torch.Generator().manual_seed(seed))
        _check_sample(labels, valid, indices, keep, s, fraction)


def test_sample_rois_uniform():
    """Many independent draws at once (the same image repeated over the batch): each foreground row is chosen
    with frequency num_pos / #fg and each background row with num_neg / #bg, within 5 standard errors."""
    n = 4000
    labels = torch.tensor([-1, 3, -2, -1, 0, -1, 1, -1, -1, 2, -1, 0, -1, -1, 1, -1, -1, -1, 4, -1])
    valid = torch.ones_like(labels, dtype=torch.bool)
    valid[7] = False
    s, fraction = 8, 0.5  # 7 fg rows -> 4 positives; 11 valid bg rows -> 4 negatives
    indices, keep = sample_rois(labels.expand(n, -1), valid.expand(n, -1), s, fraction,
                                generator=torch.Generator().manual_seed(0))
    counts = torch.zeros(n, labels.numel()).scatter_add_(1, indices, keep.float()).sum(0) / n  # (P,) frequencies
    fg = valid & (labels >= 0)
    bg = valid & (labels == -1)
    for group, expected in ((fg, 4 / 7), (bg, 4 / 11)):
        se = (expected * (1 - expected) / n) ** 0.5
        assert ((counts[group] - expected).abs() < 5 * se).all(), (counts[group], expected)
    assert (counts[~(fg | bg)] == 0).all()
    # the order inside the positives is uniform too: each fg row leads slot 0 with frequency 1 / 7
    first = torch.bincount(indices[:, 0], minlength=labels.numel()).float() / n
    se = ((1 / 7) * (6 / 7) / n) ** 0.5
    assert ((first[fg] - 1 / 7).abs() < 5 * se).all()


def test_sample_rois_deterministic_under_generator():
    labels, valid = _random_labels(4, 200, seed=0)
    a = sample_rois(labels, valid, 64, generator=torch.Generator().manual_seed(123))
    b = sample_rois(labels, valid, 64, generator=torch.Generator().manual_seed(123))
    c = sample_rois(labels, valid, 64, generator=torch.Generator().manual_seed(124))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_sample_rois_empty_and_compile():
    labels = torch.full((2, 0), -1)
    indices, keep = sample_rois(labels, torch.zeros(2, 0, dtype=torch.bool), 8)
    assert indices.shape == (2, 8) and not keep.any()
    labels, valid = _random_labels(3, 30, seed=1)
    compiled = torch.compile(sample_rois, backend="eager", fullgraph=True)
    indices, keep = compiled(labels, valid, 16, 0.25)
    _check_sample(labels, valid, indices, keep, 16, 0.25)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"batch_size_per_image": 0}, "batch_size_per_image"),
    ({"batch_size_per_image": 8.0}, "batch_size_per_image"),
    ({"positive_fraction": 1.5}, "positive_fraction"),
    ({"positive_fraction": -0.1}, "positive_fraction"),
    ({"labels": torch.zeros(2, 5)}, "labels"),
    ({"labels": torch.zeros(10, dtype=torch.int64)}, "labels"),
    ({"valid": torch.ones(2, 4, dtype=torch.bool)}, "valid"),
    ({"valid": torch.ones(2, 5, dtype=torch.int64)}, "valid"),
])
def test_sample_rois_bad_arguments(kwargs, match):
    args = {"labels": torch.zeros(2, 5, dtype=torch.int64), "valid": torch.ones(2, 5, dtype=torch.bool)} | kwargs
    with pytest.raises(ValueError, match=match):
        sample_rois(**args)
