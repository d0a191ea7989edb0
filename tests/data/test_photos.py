"""sample_photos: scikit-image's bundled photographs as (3, H, W) float tensors, values as skimage reads them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cvzoo.data.photos import PHOTO_NAMES, sample_photos

data = pytest.importorskip("skimage.data")


def test_colour_and_grey_photos_match_skimage():
    photos = sample_photos(["astronaut", "camera"])
    assert list(photos) == ["astronaut", "camera"]
    rgb = torch.from_numpy(data.astronaut()).float() / 255  # (512, 512, 3) uint8
    assert photos["astronaut"].shape == (3, 512, 512) and photos["astronaut"].dtype == torch.float32
    assert torch.equal(photos["astronaut"], rgb.permute(2, 0, 1))
    grey = torch.from_numpy(data.camera()).float() / 255  # (512, 512) uint8
    assert photos["camera"].shape == (3, 512, 512)
    for c in range(3):
        assert torch.equal(photos["camera"][c], grey)


def test_resize():
    photo = sample_photos("coffee", size=(100, 150))["coffee"]
    assert photo.shape == (3, 100, 150)
    src = torch.from_numpy(data.coffee()).float().permute(2, 0, 1)[None] / 255  # (1, 3, 400, 600)
    # a 4x antialiased bilinear downscale is, away from the borders, the mean under a tent over 8 x 8 inputs
    tent = torch.tensor([1, 3, 5, 7, 7, 5, 3, 1], dtype=torch.float32) / 32
    want = torch.einsum("i,j,cij->c", tent, tent, src[0, :, 4 * 50 - 2:4 * 50 + 6, 4 * 70 - 2:4 * 70 + 6])
    assert torch.allclose(photo[:, 50, 70], want, atol=1e-5)
    ref = F.interpolate(src, size=(100, 150), mode="bilinear", align_corners=False, antialias=True)[0]
    assert torch.allclose(photo, ref.clamp(0, 1))
    assert sample_photos("moon", size=64)["moon"].shape == (3, 64, 64)


def test_every_listed_photo_loads_offline():
    photos = sample_photos()
    assert tuple(photos) == PHOTO_NAMES
    for name, photo in photos.items():
        assert photo.ndim == 3 and photo.shape[0] == 3, name
        assert float(photo.min()) >= 0 and float(photo.max()) <= 1, name


def test_bad_arguments():
    with pytest.raises(ValueError, match="names"):
        sample_photos(["lena"])
    with pytest.raises(ValueError, match="size"):
        sample_photos("camera", size=(0, 10))
