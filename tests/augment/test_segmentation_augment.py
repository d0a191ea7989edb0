"""SegmentationAugment and SegmentationTransform (cvzoo/augment/segmentation.py): masks follow their images."""

import math

import pytest
import torch
import torch.nn.functional as F

K = pytest.importorskip("kornia.augmentation")

from cvzoo.augment import PRESETS, SegmentationAugment, SegmentationTransform, segmentation_transforms  # noqa: E402

IGNORE = 255


def striped_batch(b: int, h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose channel 0 is vertical 0/1 stripes f(x) and channel 1 horizontal ones g(y); mask = f + 2 g.

    Bilinear interpolation of a function of x alone is linear interpolation in x, so thresholding it at 0.5
    picks the nearer of the two source columns: what nearest resampling of the mask picks.
    """
    g = torch.Generator().manual_seed(seed)
    fx = (torch.rand(b, 1, math.ceil(w / 4), generator=g) > 0.5).float().repeat_interleave(4, -1)[..., :w]  # (B, 1, W)
    gy = (torch.rand(b, math.ceil(h / 4), 1, generator=g) > 0.5).float().repeat_interleave(4, -2)[:, :h]  # (B, H, 1)
    images = torch.stack([fx.expand(b, h, w), gy.expand(b, h, w), torch.full((b, h, w), 0.5)], 1)  # (B, 3, H, W)
    return images, (fx + 2 * gy).long().expand(b, h, w).clone()


def threshold_labels(images: torch.Tensor) -> torch.Tensor:
    return (images[:, 0] > 0.5).long() + 2 * (images[:, 1] > 0.5).long()  # (B, H, W)


def near_an_edge(masks: torch.Tensor) -> torch.Tensor:
    """(B, H, W) -> bool: pixels whose 3 x 3 neighbourhood holds two labels (ignore included), or on the frame.

    There the bilinear image and the nearest mask may disagree: at a label edge by up to a pixel after two
    resamplings (crop, then affine), at the frame because the image blends in the zero padding outside it.
    """
    m = masks.float()[:, None]
    edge = (F.max_pool2d(m, 3, 1, 1) != -F.max_pool2d(-m, 3, 1, 1))[:, 0]
    edge[:, [0, -1], :] = True
    edge[:, :, [0, -1]] = True
    return edge


def geometric_part(preset: str, size: tuple[int, int]) -> list:
    return [op for op in segmentation_transforms(preset, size) if not isinstance(op, K.IntensityAugmentationBase2D)]


# ---------------------------------------------------------------- closed forms


def test_horizontal_flip_moves_image_and_mask_alike():
    images = torch.rand(2, 3, 9, 13)
    masks = torch.randint(0, 5, (2, 9, 13))
    masks[0, 2, :3] = IGNORE
    out, out_masks = SegmentationTransform([K.RandomHorizontalFlip(p=1.0)])(images, masks)
    assert torch.equal(out, images.flip(-1))
    assert out_masks.dtype == torch.int64 and torch.equal(out_masks, masks.flip(-1))


def test_rotation_resamples_the_mask_nearest_and_pads_with_ignore():
    s, angle = 32, 37.0
    masks = torch.randint(0, 4, (1, s, s))
    images = torch.rand(1, 3, s, s) * 0.5 + 0.5  # never 0, so the zero padding shows
    out, out_masks = SegmentationTransform([K.RandomRotation((angle, angle), p=1.0)])(images, masks)
    # kornia turns the picture counter-clockwise about the centre c = (S - 1) / 2 in pixel-index coordinates:
    # output pixel p reads the source at c + R(-angle) (p - c), R(-a) = [[cos a, -sin a], [sin a, cos a]]
    c = (s - 1) / 2
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    ys, xs = torch.meshgrid(torch.arange(s, dtype=torch.float64), torch.arange(s, dtype=torch.float64), indexing="ij")
    sx = c + cos * (xs - c) - sin * (ys - c)
    sy = c + sin * (xs - c) + cos * (ys - c)
    for coord in (sx, sy):  # no ties between two source pixels (at 45 degrees the diagonals hit some)
        assert float(((coord - coord.floor()) - 0.5).abs().min()) > 0.04
    col, row = sx.round().long(), sy.round().long()  # nearest source pixel
    inside = (col >= 0) & (col < s) & (row >= 0) & (row < s)
    expected = torch.where(inside, masks[0, row.clamp(0, s - 1), col.clamp(0, s - 1)], IGNORE)
    assert torch.equal(out_masks[0], expected)
    assert 0 < int((~inside).sum()) < s * s // 2  # the corners come from outside
    # a check on `inside` from the image: pure padding (0) where bilinear reads only outside pixels, none inside
    far = (sx <= -1) | (sx >= s) | (sy <= -1) | (sy >= s)
    assert bool(far.any()) and bool((out[0, :, far] == 0).all()) and bool((out[0, :, inside] > 0).all())


def test_photometric_steps_leave_the_mask_alone():
    images, masks = torch.rand(4, 3, 16, 16), torch.randint(0, 3, (4, 16, 16))
    ops = [K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=1.0), K.RandomGrayscale(p=1.0)]
    out, out_masks = SegmentationTransform(ops)(images, masks)
    assert not torch.allclose(out, images) and torch.equal(out_masks, masks)


def test_a_custom_ignore_index_marks_padding_and_is_kept():
    masks = torch.zeros(1, 32, 32, dtype=torch.int64)
    masks[0, 10:20, 10:20] = -1  # ignore pixels in the input, away from the rotated-out corners
    t = SegmentationTransform([K.RandomRotation((45.0, 45.0), p=1.0)], ignore_index=-1)
    _, out_masks = t(torch.rand(1, 3, 32, 32), masks)
    assert set(out_masks.unique().tolist()) == {-1, 0}
    assert bool((out_masks[0, 14:17, 14:17] == -1).all())  # the centre stays where it was
    assert bool((out_masks[0, 0, 0] == -1) & (out_masks[0, 0, 16] == 0))  # a corner from outside, an edge middle


# ---------------------------------------------------------------- presets


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_geometry_keeps_image_and_mask_aligned(preset):
    """The preset's geometric steps, run alone: the thresholded image equals the mask up to edge pixels."""
    torch.manual_seed(0)  # kornia draws from the global generator
    images, masks = striped_batch(16, 60, 52)
    out, out_masks = SegmentationTransform(geometric_part(preset, (48, 40)), output_size=(48, 40))(images, masks)
    valid = out_masks != IGNORE
    assert float(valid.float().mean()) > 0.5
    wrong = (threshold_labels(out) != out_masks) & valid
    assert int((wrong & ~near_an_edge(out_masks)).sum()) == 0
    assert float(wrong.float().mean()) < 0.05


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("size", [(24, 40), 32])
def test_preset_output_labels_dtype_and_size(preset, size):
    torch.manual_seed(0)
    images = torch.rand(8, 3, 30, 36)
    masks = torch.randint(0, 5, (8, 30, 36), dtype=torch.uint8)  # any integer dtype in, int64 out
    masks[:, :4, :4] = IGNORE
    aug = SegmentationAugment(preset, size=size)
    out, out_masks = aug(images, masks)
    expected = size if isinstance(size, tuple) else (size, size)
    assert aug.output_size == expected and out.shape == (8, 3, *expected) and out_masks.shape == (8, *expected)
    assert out_masks.dtype == torch.int64
    assert set(out_masks.unique().tolist()) <= {0, 1, 2, 3, 4, IGNORE}
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert f"preset={preset!r}" in repr(aug) and "ignore_index=255" in repr(aug)


def test_preset_steps():
    names = {p: [type(op).__name__ for op in segmentation_transforms(p, (8, 8))] for p in PRESETS}
    assert names["light"][:2] == ["Resize", "RandomHorizontalFlip"]
    assert names["heavy"][0] == "RandomResizedCrop" and "RandomGrayscale" in names["heavy"]
    no_flip = [type(op).__name__ for op in segmentation_transforms("medium", (8, 8), hflip=False)]
    assert "RandomHorizontalFlip" not in no_flip


def test_bad_arguments_raise_value_errors():
    with pytest.raises(ValueError, match="preset must be one of .*got 'extreme'"):
        SegmentationAugment("extreme", size=8)
    with pytest.raises(ValueError, match=r"size must be .*got \(0, 0\)"):
        SegmentationAugment("light", size=0)
    with pytest.raises(ValueError, match="ignore_index must be an integer, got 255.0"):
        SegmentationAugment("light", size=8, ignore_index=255.0)
    aug = SegmentationAugment("light", size=8)
    images = torch.rand(2, 3, 10, 12)
    with pytest.raises(ValueError, match=r"masks must be an integer tensor \(B, H, W\) = \(2, 10, 12\).*float32"):
        aug(images, torch.zeros(2, 10, 12))
    with pytest.raises(ValueError, match=r"masks must be .* got \(2, 1, 10, 12\)"):
        aug(images, torch.zeros(2, 1, 10, 12, dtype=torch.int64))
    with pytest.raises(ValueError, match="masks must hold class indices >= 0 or ignore_index=255, got the value -1"):
        aug(images, torch.full((2, 10, 12), -1))
    with pytest.raises(ValueError, match="images must be a float tensor"):
        aug(images[0], torch.zeros(10, 12, dtype=torch.int64))
