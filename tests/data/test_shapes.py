"""Shapes: deterministic per item, disjoint splits, annotations that agree with the drawn pixels."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import masks_to_boxes

from cvzoo.data.info import DatasetInfo
from cvzoo.data.shapes import _STAR_INNER_RATIO, CLASSES, Shapes, _draw_shape, item_seed, shape_price

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def detection() -> Shapes:
    return Shapes("train", num_images=40, seed=3, image_size=96, max_size=40)  # small images: a fast test


def _fingerprint(image: torch.Tensor) -> float:
    return float((image.double() * torch.arange(image.numel(), dtype=torch.float64).view(image.shape).sin()).sum())


def test_items_are_the_same_on_every_construction_and_in_any_order():
    a = Shapes("val", num_images=8, seed=5)
    b = Shapes("val", num_images=8, seed=5, cache=False)
    for i in (7, 2, 0):  # b draws out of order
        ia, ta = a[i]
        ib, tb = b[i]
        assert torch.equal(ia, ib)
        for key in ta:
            assert torch.equal(ta[key], tb[key]), key
    assert not torch.equal(a[0][0], Shapes("val", num_images=8, seed=6)[0][0])  # the seed matters


def test_items_are_the_same_in_another_process():
    code = ("from cvzoo.data.shapes import Shapes\nimport torch\n"
            "img = Shapes('test', num_images=4, seed=1)[3][0]\n"
            "print(repr(float((img.double() * torch.arange(img.numel(), dtype=torch.float64)"
            ".view(img.shape).sin()).sum())))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert float(out.stdout) == _fingerprint(Shapes("test", num_images=4, seed=1)[3][0])


def test_splits_are_disjoint():
    seeds = {split: {item_seed(0, split, i) for i in range(1000)} for split in ("train", "val", "test")}
    assert len(seeds["train"] | seeds["val"] | seeds["test"]) == 3000
    prints = {split: {_fingerprint(Shapes(split, num_images=12, image_size=48, max_size=24)[i][0]) for i in range(12)}
              for split in ("train", "val", "test")}
    assert all(len(p) == 12 for p in prints.values())
    assert not prints["train"] & prints["val"] and not prints["train"] & prints["test"]
    assert not prints["val"] & prints["test"]


def test_keypoint_flip_order_keeps_top_right_bottom_left(detection):
    """After a horizontal flip (x -> W - x) and the info's reordering, keypoint 1 is still the rightmost
    extreme point and keypoint 3 the leftmost; top and bottom keep their places."""
    w = detection.info.image_size[1]
    for i in range(4):
        kp = detection[i][1]["keypoints"]
        flipped = kp.clone()
        flipped[..., 0] = w - flipped[..., 0]
        flipped = flipped[:, list(detection.info.keypoint_flip)]
        x, y = flipped[..., 0], flipped[..., 1]
        assert (x[:, 1] >= x.amax(dim=1) - 1e-4).all() and (x[:, 3] <= x.amin(dim=1) + 1e-4).all()
        assert (y[:, 0] <= y.amin(dim=1) + 1e-4).all() and (y[:, 2] >= y.amax(dim=1) - 1e-4).all()


def test_info_describes_the_samples(detection):
    image, target = detection[0]
    assert detection.info == DatasetInfo("shapes", "detection", CLASSES, 3, (96, 96),
                                         ("boxes", "labels", "masks", "keypoints", "price"), keypoint_flip=(0, 3, 2, 1))
    assert tuple(target) == detection.info.target_fields
    assert image.shape == (3, 96, 96) and image.dtype == torch.float32
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert len(detection) == 40 and len(Shapes("train")) == 512 and len(Shapes("val")) == 128
    with pytest.raises(IndexError):
        detection[40]
    assert torch.equal(detection[-1][0], detection[39][0])
    assert torch.equal(detection[torch.tensor(3)][0], detection[3][0])


def test_detection_targets_agree_with_the_pixels(detection):
    counts = torch.zeros(len(CLASSES), dtype=torch.int64)
    for i in range(len(detection)):
        image, t = detection[i]
        n = len(t["labels"])
        assert 1 <= n <= 4
        assert t["boxes"].shape == (n, 4) and t["boxes"].dtype == torch.float32
        assert t["labels"].dtype == torch.int64 and t["masks"].dtype == torch.bool
        assert t["masks"].shape == (n, 96, 96) and t["keypoints"].shape == (n, 4, 3)
        assert t["price"].shape == (n,) and t["price"].dtype == torch.float32
        assert bool(((t["price"] >= 0) & (t["price"] <= 1)).all())
        assert bool(((t["labels"] >= 0) & (t["labels"] < len(CLASSES))).all())
        counts += torch.bincount(t["labels"], minlength=len(CLASSES))
        # boxes are the tight boxes of the visible masks: torchvision's inclusive pixel box, one past the end
        assert torch.equal(t["boxes"], masks_to_boxes(t["masks"]) + torch.tensor([0.0, 0.0, 1.0, 1.0]))
        assert int(t["masks"].sum(0).max()) == 1  # a pixel is visible in one object at most
        for k in range(n):
            pixels = image[:, t["masks"][k]]  # (3, M): one flat colour plus the sensor noise
            assert float(pixels.std(dim=1).max()) < 0.03
            kp = t["keypoints"][k]
            rows, cols = kp[:, 1].long(), kp[:, 0].long()
            assert torch.equal(kp[:, :2], torch.stack([cols, rows], dim=1) + 0.5)  # pixel centres
            on_mask = t["masks"][k][rows, cols]
            assert torch.equal(kp[:, 2], on_mask.float())  # visible exactly where the object is seen
            hidden = kp[:, 2] == 0  # occluded keypoints lie under a later object
            assert bool(t["masks"][k + 1:, rows[hidden], cols[hidden]].any(dim=0).all())
            # the price is 0.5 * size fraction + 0.5 * brightness of the drawn colour
            size_part = float(t["price"][k]) - 0.5 * float(pixels.mean())
            assert -0.01 <= size_part <= 0.51
    assert bool((counts > 0).all())


def test_colours_stand_out_from_the_surroundings(detection):
    for i in range(10):
        image, t = detection[i]
        anything = t["masks"].any(dim=0)
        for mask in t["masks"]:
            ring = F.max_pool2d(mask[None, None].float(), 9, stride=1, padding=4)[0, 0].bool() & ~anything
            if int(ring.sum()) < 20:
                continue
            gap = (image[:, mask].mean(1) - image[:, ring].mean(1)).norm()
            assert float(gap) > 0.25


def test_shape_areas_and_extreme_points_match_closed_forms():
    grid = torch.arange(200, dtype=torch.float32) + 0.5
    ys, xs = torch.meshgrid(grid, grid, indexing="ij")
    r, cx, cy, angle = 60.0, 100.3, 99.6, 0.3
    areas = {0: math.pi * r**2, 1: 2 * r**2, 2: 3 * math.sqrt(3) / 4 * r**2,
             3: 5 * r * (_STAR_INNER_RATIO * r) * math.sin(math.pi / 5)}  # star: 5 kites of two triangles
    for label, area in areas.items():
        mask, ext = _draw_shape(label, cx, cy, r, angle, xs, ys)
        assert abs(int(mask.sum()) - area) / area < 0.01, CLASSES[label]
        # extreme points: distance r from the centre, and the shape reaches them (within a pixel)
        assert torch.allclose((ext - torch.tensor([cx, cy])).norm(dim=1), torch.full((4,), r), atol=1e-3)
        rows, cols = mask.nonzero(as_tuple=True)
        reach = torch.stack([cy - rows.min(), cols.max() + 1 - cx, rows.max() + 1 - cy, cx - cols.min()]).float()
        side = torch.tensor([cy - ext[0, 1], ext[1, 0] - cx, ext[2, 1] - cy, cx - ext[3, 0]])
        assert torch.allclose(reach, side, atol=1.0), CLASSES[label]
    # at angle 0 a square stands on a corner: its corners lie straight up, right, down and left of its centre
    _, ext = _draw_shape(1, cx, cy, r, 0.0, xs, ys)
    want = torch.tensor([[cx, cy - r], [cx + r, cy], [cx, cy + r], [cx - r, cy]])
    assert torch.allclose(ext, want, atol=1e-3)


def test_shape_price_closed_form():
    size = torch.tensor([16.0, 48.0, 32.0])
    colour = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.3, 0.6, 0.9]])
    assert torch.allclose(shape_price(size, colour, 16, 48), torch.tensor([0.0, 1.0, 0.25 + 0.3]))
    assert torch.allclose(shape_price(size[:1], colour[:1], 16, 16), torch.tensor([0.25]))


def test_single_object_tasks():
    small = {"image_size": 64, "min_size": 12, "max_size": 32}
    cls = Shapes("train", num_images=100, task="classification", seed=1, **small)
    image, label = cls[0]
    assert image.shape == (3, 64, 64) and label.dtype == torch.int64 and label.shape == ()
    assert cls.info.task == "classification" and cls.info.target_fields == ("label",)
    labels = torch.stack([cls[i][1] for i in range(100)])
    assert bool((torch.bincount(labels, minlength=4) >= 10).all())  # every class appears

    det = Shapes("train", num_images=6, task="detection", seed=1, min_objects=1, max_objects=1, **small)
    reg = Shapes("train", num_images=6, task="regression", seed=1, **small)
    multi = Shapes("train", num_images=6, task="multitask", seed=1, image_size=96, max_size=40)
    multi_det = Shapes("train", num_images=6, task="detection", seed=1, image_size=96, max_size=40, max_objects=1)
    for i in range(6):
        _, t = det[i]
        assert torch.equal(cls[i][0], det[i][0]) and int(cls[i][1]) == int(t["labels"][0])
        value = reg[i][1]
        assert value.shape == (1,) and value.dtype == torch.float32 and torch.equal(value, t["price"])
        image, mt = multi[i]
        _, td = multi_det[i]
        assert image.shape == (3, 96, 96) and set(mt) == {"label", "value", "keypoints"}
        assert mt["label"].shape == () and mt["label"].dtype == torch.int64 and int(mt["label"]) == int(td["labels"][0])
        assert mt["value"].shape == (1,) and torch.equal(mt["value"], td["price"])
        assert mt["keypoints"].shape == (4, 2)
        assert torch.allclose(mt["keypoints"], td["keypoints"][0, :, :2] / 96)
        assert bool(((mt["keypoints"] > 0) & (mt["keypoints"] < 1)).all())
        # one object, nothing occludes it: the extreme points are on the edges of its box
        box = td["boxes"][0]
        kp = td["keypoints"][0]
        assert torch.equal(kp[:, 2], torch.ones(4))
        edges = torch.stack([kp[0, 1] - box[1], box[2] - kp[1, 0], box[3] - kp[2, 1], kp[3, 0] - box[0]])
        assert bool((edges >= 0.5).all() and (edges <= 2.0).all()), edges


def test_multitask_samples_feed_the_multitask_model():
    from torch.utils.data import default_collate

    from cvzoo.zoo import resnet_micro_multitask

    images, targets = default_collate([Shapes("val", num_images=4, task="multitask", image_size=64, max_size=32)[i]
                                       for i in range(4)])
    model = resnet_micro_multitask()
    losses = model.loss(images, targets)
    assert set(losses) == {"loss", "label", "value", "keypoints"}
    assert bool(torch.isfinite(losses["loss"]))


def test_full_visibility_means_no_occlusion():
    ds = Shapes("test", num_images=10, image_size=64, min_size=12, max_size=24, min_objects=3, min_visibility=1.0)
    for i in range(10):
        _, t = ds[i]
        assert bool((t["keypoints"][..., 2] == 1).all())
        assert len(t["labels"]) >= 2  # objects still fit side by side


def test_empty_images_are_allowed():
    image, t = Shapes("train", num_images=2, min_objects=0, max_objects=0)[1]
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and t["masks"].shape == (0, 128, 128)
    assert t["keypoints"].shape == (0, 4, 3) and t["price"].shape == (0,)


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"split": "valid"}, "split"),
    ({"task": "panoptic"}, "task"),
    ({"num_images": 0}, "num_images"),
    ({"image_size": 4}, "image_size"),
    ({"min_objects": -1}, "min_objects"),
    ({"min_objects": 3, "max_objects": 2}, "max_objects"),
    ({"min_size": 2}, "min_size"),
    ({"min_size": 20, "max_size": 10}, "max_size"),
    ({"max_size": 200}, "max_size"),
    ({"min_visibility": 1.5}, "min_visibility"),
    ({"seed": -1}, "seed"),
    ({"num_images": 2.5}, "num_images"),
])
def test_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Shapes(**kwargs)
