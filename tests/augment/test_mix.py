"""Cutout, CutMix and MixUp (cvzoo/augment/mix.py): labels checked against the pixels actually mixed."""

import pytest
import torch

pytest.importorskip("kornia")

from cvzoo.augment import CutMix, Cutout, MixUp  # noqa: E402


def constant_batch(b=8, h=12, w=20):
    """Image i is the constant (i + 1) / (b + 1): every pixel tells which image it came from."""
    return torch.arange(1, b + 1, dtype=torch.float32).div(b + 1).view(b, 1, 1, 1).expand(b, 3, h, w).clone()


@pytest.mark.parametrize("soft", [False, True])
def test_mixup_labels_use_the_pixel_lambda(soft):
    b, k = 8, 10
    images = constant_batch(b)
    labels = torch.arange(b) % k
    if soft:  # soft labels in, e.g. from label smoothing
        labels = torch.nn.functional.one_hot(labels, k).float() * 0.9 + 0.01
    out, y = MixUp(alpha=0.4, num_classes=k)(images, labels)
    assert out.shape == images.shape and y.shape == (b, k)
    a, p = images, images.roll(1, 0)  # image i is mixed with image i - 1
    lam = ((out - p) / (a - p)).flatten(1)  # (B, HWC): one lambda per image, recovered from the pixels
    assert torch.allclose(lam, lam[:, :1].expand_as(lam), atol=1e-5)
    lam = lam[:, 0:1]
    y_in = labels if soft else torch.nn.functional.one_hot(labels, k).float()
    assert torch.allclose(y, lam * y_in + (1 - lam) * y_in.roll(1, 0), atol=1e-5)
    assert (lam > 0).all() and (lam < 1).all()


def test_mixup_p0_is_identity():
    images = constant_batch(4)
    out, y = MixUp(num_classes=5, p=0.0)(images, torch.tensor([0, 1, 2, 3]))
    assert torch.equal(out, images)
    assert torch.equal(y, torch.eye(5)[:4])


def test_cutmix_label_weight_equals_replaced_pixel_fraction():
    b, h, w, k = 64, 12, 20, 64  # 64 draws: many boxes are clipped at the image border
    images = constant_batch(b, h, w)
    labels = torch.arange(b)
    out, y = CutMix(alpha=1.0, num_classes=k)(images, labels)
    replaced = out[:, 0] != images[:, 0]  # (B, H, W)
    assert torch.equal(out[:, 0][replaced], images.roll(1, 0)[:, 0][replaced])  # pasted from image i - 1
    frac = replaced.flatten(1).float().mean(1)
    assert torch.allclose(y[torch.arange(b), labels.roll(1)], frac, atol=1e-6)
    assert torch.allclose(y[torch.arange(b), labels], 1 - frac, atol=1e-6)
    assert torch.allclose(y.sum(1), torch.ones(b))
    # the replaced pixels form one axis-aligned rectangle
    rows, cols = replaced.any(2), replaced.any(1)
    assert torch.equal(replaced, rows[:, :, None] & cols[:, None, :])
    # some boxes were clipped: their area is below the unclipped rounded size for any lambda
    assert (frac > 0).any() and (frac < 1).all()


def test_cutmix_soft_labels_and_p0():
    b, k = 4, 3
    soft = torch.softmax(torch.randn(b, k), 1)
    images = constant_batch(b)
    out, y = CutMix(num_classes=k)(images, soft)
    frac = (out[:, 0] != images[:, 0]).flatten(1).float().mean(1, keepdim=True)
    assert torch.allclose(y, (1 - frac) * soft + frac * soft.roll(1, 0), atol=1e-6)
    out, y = CutMix(num_classes=k, p=0.0)(images, soft)
    assert torch.equal(out, images) and torch.allclose(y, soft)


def test_cutout_erases_one_rectangle_within_scale():
    images = torch.rand(16, 3, 20, 24) * 0.5 + 0.5  # never 0, so erased pixels are exactly the zeros
    labels = torch.arange(16)
    out, same = Cutout(scale=(0.05, 0.2), value=0.0, p=1.0)(images, labels)
    assert same is labels
    erased = (out == 0).all(1)  # (B, H, W)
    frac = erased.flatten(1).float().mean(1)
    assert (frac >= 0.05 - 0.02).all() and (frac <= 0.2 + 0.02).all()  # area rounded to whole pixels
    assert torch.equal(erased, erased.any(2)[:, :, None] & erased.any(1)[:, None, :])
    assert torch.equal(out[~erased[:, None].expand_as(out)], images[~erased[:, None].expand_as(out)])
    out, _ = Cutout(p=0.0)(images)
    assert torch.equal(out, images)


def test_mix_determinism_under_seed():
    images = torch.rand(4, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 3])
    for aug in (MixUp(num_classes=4), CutMix(num_classes=4), Cutout(p=1.0)):
        torch.manual_seed(3)
        a = aug(images, labels)
        torch.manual_seed(3)
        b = aug(images, labels)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_mix_bad_arguments():
    with pytest.raises(ValueError, match="alpha"):
        MixUp(alpha=0.0, num_classes=3)
    with pytest.raises(ValueError, match="alpha"):
        CutMix(alpha=-1.0, num_classes=3)
    with pytest.raises(ValueError, match="num_classes"):
        CutMix(num_classes=0)
    with pytest.raises(ValueError, match="p must"):
        MixUp(num_classes=3, p=2.0)
    with pytest.raises(ValueError, match="scale"):
        Cutout(scale=(0.5, 0.1))
    images = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="labels"):
        MixUp(num_classes=3)(images, torch.tensor([0, 3]))  # class id out of range
    with pytest.raises(ValueError, match="labels"):
        CutMix(num_classes=3)(images, torch.zeros(2, 4))  # K mismatch
    with pytest.raises(ValueError, match="images"):
        CutMix(num_classes=3)(images[0], torch.tensor([0, 1]))
