"""ClassificationAugment and DetectionAugment presets (cvzoo/augment/presets.py)."""

import subprocess
import sys

import pytest
import torch

pytest.importorskip("kornia")

from cvzoo.augment import PRESETS, ClassificationAugment, DetectionAugment  # noqa: E402


def test_import_does_not_import_kornia():
    code = "import sys, cvzoo.augment; assert 'kornia' not in sys.modules, 'kornia imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("size", [(24, 32), 40])
def test_classification_output_size(preset, size):
    aug = ClassificationAugment(preset, size=size)
    images = torch.rand(3, 3, 30, 36)  # the raw size differs from `size`
    labels = torch.tensor([0, 1, 2])
    out, same = aug(images, labels)
    expected = size if isinstance(size, tuple) else (size, size)
    assert aug.output_size == expected and out.shape == (3, 3, *expected)
    assert same is labels
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def detection_batch(b=3, h=30, w=36):
    targets = []
    for i in range(b):
        boxes = torch.tensor([[2.0, 3.0, 14.0, 20.0], [10.0, 12.0, 34.0, 28.0], [20.0, 0.0, 30.0, 9.0]])
        masks = torch.zeros(3, h, w, dtype=torch.bool)
        for j, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
            masks[j, y1:y2, x1:x2] = True
        centres = torch.cat([(boxes[:, :2] + boxes[:, 2:]) / 2, torch.full((3, 1), 2.0)], 1)
        corners = torch.cat([boxes[:, :2], torch.ones(3, 1)], 1)
        keypoints = torch.stack([centres, corners], 1)  # (N, 2, 3)
        targets.append(
            {
                "boxes": boxes,
                "labels": torch.tensor([1, 2, 3]),
                "masks": masks,
                "keypoints": keypoints,
                "price": torch.tensor([1.5, 2.5, 3.5]),
                "image_id": i,
            }
        )
    return torch.rand(b, 3, h, w), targets


@pytest.mark.parametrize("preset", PRESETS)
def test_detection_output_size_and_consistent_fields(preset):
    images, targets = detection_batch()
    aug = DetectionAugment(preset, size=(24, 40), min_visibility=0.3)
    out, res = aug(images, targets)
    assert aug.output_size == (24, 40) and out.shape == (3, 3, 24, 40)
    for r, t in zip(res, targets):
        n = len(r["boxes"])
        assert n <= 3 and all(len(r[k]) == n for k in ("labels", "masks", "keypoints", "price"))
        assert r["masks"].shape[1:] == (24, 40) and r["masks"].dtype == torch.bool
        assert r["image_id"] == t["image_id"]
        # each surviving object keeps its own fields together (price = label + 0.5)
        assert torch.equal(r["price"], r["labels"].float() + 0.5)
        b = r["boxes"]
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= 40).all() and (b[:, 3] <= 24).all()
        assert ((b[:, 2] - b[:, 0]) >= 1).all() and ((b[:, 3] - b[:, 1]) >= 1).all()


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_deterministic_under_seed(preset):
    images, targets = detection_batch()
    cls = ClassificationAugment(preset, size=20)
    det = DetectionAugment(preset, size=20)
    results = []
    for _ in range(2):
        torch.manual_seed(123)
        results.append((cls(images)[0], *det(images, targets)))
    (c1, d1, t1), (c2, d2, t2) = results
    assert torch.equal(c1, c2) and torch.equal(d1, d2)
    for a, b in zip(t1, t2):
        assert all(torch.equal(a[k], b[k]) for k in ("boxes", "labels", "masks", "keypoints"))
    torch.manual_seed(124)
    assert not torch.equal(cls(images)[0], c1)


def test_presets_bad_arguments():
    for make in (ClassificationAugment, DetectionAugment):
        with pytest.raises(ValueError, match="preset"):
            make("extreme", size=32)
        for size in (0, -4, (32, 0), (32,), (32.0, 32.0)):
            with pytest.raises(ValueError, match="size"):
                make("light", size=size)
    for v in (-0.1, 1.5):
        with pytest.raises(ValueError, match="min_visibility"):
            DetectionAugment("light", size=32, min_visibility=v)
    with pytest.raises(ValueError, match="images"):
        ClassificationAugment("light", size=32)(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="labels"):
        ClassificationAugment("light", size=32)(torch.rand(2, 3, 8, 8), torch.zeros(3, dtype=torch.long))


@pytest.mark.cuda
def test_everything_runs_on_cuda():
    from cvzoo.augment import CutMix, DetectionMixUp, MixUp, Mosaic

    dev = torch.device("cuda")
    images, targets = detection_batch()
    images = images.to(dev)
    out, res = DetectionAugment("heavy", size=(24, 40))(images, targets)  # CPU targets are moved along
    assert out.device.type == "cuda" and all(r["boxes"].device.type == "cuda" for r in res)
    out, res = Mosaic(48)(images, targets)
    assert out.shape == (3, 3, 48, 48) and res[0]["masks"].device.type == "cuda"
    out, res = DetectionMixUp()(images, targets)
    assert res[0]["weight"].device.type == "cuda"
    assert ClassificationAugment("heavy", size=16)(images)[0].device.type == "cuda"
    labels = torch.tensor([0, 1, 2], device=dev)
    assert CutMix(num_classes=3)(images, labels)[1].device.type == "cuda"
    assert MixUp(num_classes=3)(images, labels)[1].device.type == "cuda"
