"""A class activation map blended over its image, with the colormap written in torch (no matplotlib, no cv2)."""

from __future__ import annotations

import torch
from torch import Tensor

COLORMAPS = ("jet", "gray")


def apply_colormap(cam: Tensor, colormap: str = "jet") -> Tensor:
    """(H, W) values in [0, 1] -> (3, H, W) float RGB in [0, 1].

    "jet" is MATLAB's and OpenCV's (`cv2.COLORMAP_JET`, which pytorch-grad-cam's `show_cam_on_image`
    uses): channel k is clamp(1.5 - |4 x - c_k|, 0, 1) with c = 3, 2, 1 for red, green, blue, so 0 is
    dark blue (0, 0, 0.5), 0.5 green (0.5, 1, 0.5) and 1 dark red (0.5, 0, 0). "gray" repeats the value.
    """
    if colormap not in COLORMAPS:
        raise ValueError(f"colormap must be one of {COLORMAPS}, got {colormap!r}")
    x = cam.float()
    if colormap == "gray":
        return x.expand(3, *x.shape).clone()
    centres = torch.tensor([3.0, 2.0, 1.0], device=x.device).view(3, 1, 1)
    return (1.5 - (4 * x - centres).abs()).clamp(0, 1)  # (3, H, W)


def overlay(image: Tensor, cam: Tensor, alpha: float = 0.5, colormap: str = "jet") -> Tensor:
    """(3, H, W) image and (H, W) map -> (3, H, W) uint8 RGB: (1 - alpha) * image + alpha * colormap(cam).

    `image` is float in [0, 1] or uint8 ((1, H, W) grey works too); `cam` is in [0, 1] (a CAM's output
    row). alpha=0 gives the image back, alpha=1 the colour-mapped map; the blend is rounded once, at the
    end. Unlike pytorch-grad-cam's show_cam_on_image the blend is not rescaled by its maximum.
    """
    if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] not in (1, 3):
        got = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"image must be a (3, H, W) or (1, H, W) tensor, got {got}")
    if image.dtype == torch.uint8:
        img = image.float() / 255
    elif image.is_floating_point():
        img = image.float()
        if img.numel() and not (bool(torch.isfinite(img).all()) and img.min() >= 0 and img.max() <= 1):
            raise ValueError(f"image is float with values in [{img.min():.3g}, {img.max():.3g}]; expected [0, 1] "
                             "(undo the normalisation first) or a uint8 image")
    else:
        raise ValueError(f"image must be float in [0, 1] or uint8, got dtype {image.dtype}")
    if not isinstance(cam, Tensor) or cam.shape != image.shape[1:]:
        got = tuple(cam.shape) if isinstance(cam, Tensor) else type(cam).__name__
        raise ValueError(f"cam must be an (H, W) = {tuple(image.shape[1:])} tensor matching the image, got {got}")
    if not cam.is_floating_point() or (cam.numel() and not (bool(torch.isfinite(cam).all()) and cam.min() >= 0
                                                            and cam.max() <= 1)):
        raise ValueError(f"cam must be floating with values in [0, 1], got dtype {cam.dtype}"
                         + (f" and values in [{cam.min():.3g}, {cam.max():.3g}]" if cam.is_floating_point() else ""))
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
    heat = apply_colormap(cam.detach().to(img.device), colormap)
    blend = (1 - alpha) * img.expand(3, -1, -1) + alpha * heat
    return (blend * 255).round().clamp(0, 255).to(torch.uint8)
