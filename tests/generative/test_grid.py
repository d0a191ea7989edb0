import numpy as np
import pytest
import torch
from PIL import Image

from cvzoo.generative.grid import make_grid, save_grid


def test_tiles_land_where_expected():
    samples = torch.rand(5, 1, 4, 6)
    grid = make_grid(samples, nrow=3, padding=1, pad_value=0.5)
    assert grid.shape == (3, 2 * 5 + 1, 3 * 7 + 1)
    for i in range(5):
        r, c = divmod(i, 3)
        tile = grid[:, 1 + r * 5:1 + r * 5 + 4, 1 + c * 7:1 + c * 7 + 6]
        assert torch.equal(tile, samples[i].expand(3, 4, 6))
    assert (grid[:, 0] == 0.5).all() and (grid[:, 6:, 15:] == 0.5).all()  # padding and the empty sixth tile


def test_default_grid_is_square_ish_and_values_are_clamped():
    grid = make_grid(torch.full((10, 3, 2, 2), 2.0), padding=0)
    assert grid.shape == (3, 3 * 2, 4 * 2)
    assert grid.max() == 1.0


def test_save_grid_writes_a_scaled_png(tmp_path):
    samples = torch.rand(4, 3, 8, 8)
    path = save_grid(samples, tmp_path / "deep" / "grid.png", nrow=2, padding=0, scale=2)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (32, 32)
        pixels = torch.from_numpy(np.array(im)).float()
    expected = (samples[0].permute(1, 2, 0) * 255).round()
    assert torch.equal(pixels[0:16:2, 0:16:2], expected)


@pytest.mark.parametrize("bad,kwargs,message", [
    (torch.rand(2, 2, 4, 4), {}, "samples must be a \\(N, C, H, W\\) tensor with C 1 or 3"),
    (torch.rand(0, 1, 4, 4), {}, "samples is empty"),
    (torch.zeros(2, 1, 4, 4, dtype=torch.uint8), {}, "floating images"),
    (torch.rand(2, 1, 4, 4), {"nrow": 0}, "nrow must be a positive integer"),
    (torch.rand(2, 1, 4, 4), {"padding": -1}, "padding must be an integer >= 0"),
])
def test_bad_input(bad, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_grid(bad, **kwargs)


def test_bad_scale(tmp_path):
    with pytest.raises(ValueError, match="scale must be a positive integer, got 0"):
        save_grid(torch.rand(1, 1, 2, 2), tmp_path / "x.png", scale=0)
