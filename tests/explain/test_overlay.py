"""cvzoo.explain.overlay: the jet colormap against OpenCV's (and its closed-form anchor colours), the blend's
end points, and input validation."""

from __future__ import annotations

import pytest
import torch

from cvzoo.explain import apply_colormap, overlay


def _image(dtype=torch.float32) -> torch.Tensor:
    img = torch.rand(3, 12, 17, generator=torch.Generator().manual_seed(0))
    return (img * 255).round().to(torch.uint8) if dtype == torch.uint8 else img


def _cam() -> torch.Tensor:
    return torch.rand(12, 17, generator=torch.Generator().manual_seed(1))


def test_jet_anchor_colours():
    x = torch.tensor([[0.0, 0.125, 0.375, 0.5, 0.625, 0.875, 1.0]])
    rgb = apply_colormap(x)[:, 0].T  # (7, 3)
    expected = torch.tensor([
        [0, 0, 0.5], [0, 0, 1], [0, 1, 1], [0.5, 1, 0.5], [1, 1, 0], [1, 0, 0], [0.5, 0, 0],
    ])  # MATLAB's jet: dark blue, blue, cyan, green-ish, yellow, red, dark red
    assert torch.allclose(rgb, expected)


def test_jet_matches_opencv():
    """pytorch-grad-cam's show_cam_on_image colours with cv2.COLORMAP_JET (BGR); on the 256 uint8 levels the
    torch colormap is within half a level of it (OpenCV rounds its table)."""
    cv2 = pytest.importorskip("cv2")
    np = pytest.importorskip("numpy")
    levels = np.arange(256, dtype=np.uint8)[:, None]
    ref = cv2.applyColorMap(levels, cv2.COLORMAP_JET)[:, 0, ::-1].astype(np.float64)  # (256, 3) RGB
    ours = apply_colormap(torch.arange(256.0)[None] / 255)[:, 0].T.double() * 255  # (256, 3)
    assert np.abs(ours.numpy() - ref).max() <= 0.5 + 1e-4  # float32 arithmetic


def test_gray_colormap_repeats_the_value():
    cam = _cam()
    assert torch.equal(apply_colormap(cam, "gray"), cam.expand(3, -1, -1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_alpha_end_points(dtype):
    image, cam = _image(dtype), _cam()
    out = overlay(image, cam, alpha=0.0)
    assert out.dtype == torch.uint8 and out.shape == (3, 12, 17)
    expected = image if dtype == torch.uint8 else (image * 255).round().to(torch.uint8)
    assert torch.equal(out, expected)
    heat = (apply_colormap(cam) * 255).round().to(torch.uint8)
    assert torch.equal(overlay(image, cam, alpha=1.0), heat)


def test_half_blend_is_the_mean():
    image, cam = _image(), _cam()
    expected = ((image + apply_colormap(cam)) / 2 * 255).round().to(torch.uint8)
    assert torch.equal(overlay(image, cam), expected)  # alpha defaults to 0.5
    grey = image[:1]
    assert torch.equal(overlay(grey, cam, alpha=0.0), (grey.expand(3, -1, -1) * 255).round().to(torch.uint8))


def test_overlay_validates_its_inputs():
    image, cam = _image(), _cam()
    with pytest.raises(ValueError, match=r"image must be a \(3, H, W\) or \(1, H, W\) tensor, got \(12, 17\)"):
        overlay(image[0], cam)
    with pytest.raises(ValueError, match=r"image must be a \(3, H, W\).*got \(12, 17, 3\)"):
        overlay(image.permute(1, 2, 0), cam)
    with pytest.raises(ValueError, match=r"image is float with values in .*expected \[0, 1\]"):
        overlay(image * 3 - 1, cam)
    with pytest.raises(ValueError, match="image must be float in"):
        overlay(image.to(torch.int32), cam)
    with pytest.raises(ValueError, match=r"cam must be an \(H, W\) = \(12, 17\) tensor matching the image, got "
                                         r"\(17, 12\)"):
        overlay(image, cam.T)
    with pytest.raises(ValueError, match=r"cam must be floating with values in \[0, 1\]"):
        overlay(image, cam * 2)
    with pytest.raises(ValueError, match="alpha must lie in"):
        overlay(image, cam, alpha=1.5)
    with pytest.raises(ValueError, match="colormap must be one of"):
        overlay(image, cam, colormap="viridis")
