"""A few real photographs for demos and smoke tests: scikit-image's bundled sample images (no download)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from cvzoo._optional import require

# the 8-bit grey or RGB images that scikit-image ships inside its wheel (loadable offline); `cat` is chelsea
PHOTO_NAMES = (
    "astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "microaneurysms", "moon", "page", "retina", "rocket", "text",
)


def sample_photos(names: str | Sequence[str] | None = None,
                  size: int | tuple[int, int] | None = None) -> dict[str, Tensor]:
    """{name: image (3, H, W) float32 in [0, 1]} for the named photos (all of `PHOTO_NAMES` by default).

    Grey photos are replicated to three channels. With `size` ((H, W), or an int for a square) each photo
    is resized with bilinear interpolation and antialiasing (`align_corners=False`), so aspect ratios
    change when they differ. Needs scikit-image (`pip install 'cvzoo[data]'`).
    """
    names = PHOTO_NAMES if names is None else (names,) if isinstance(names, str) else tuple(names)
    unknown = [n for n in names if n not in PHOTO_NAMES]
    if unknown:
        raise ValueError(f"names {unknown} are not sample photos; choose from {PHOTO_NAMES}")
    if size is not None:
        size = (size, size) if isinstance(size, int) else tuple(size)
        if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
            raise ValueError(f"size must be a positive int or (H, W) of positive ints, got {size!r}")
    data = require("skimage.data", "data", "the sample photos")
    out = {}
    for name in names:
        array = getattr(data, name)()  # (H, W) or (H, W, 3) uint8
        image = torch.from_numpy(array).float().div(255.0)
        image = image.expand(3, -1, -1) if image.ndim == 2 else image.permute(2, 0, 1)  # (3, H, W)
        if size is not None:
            image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
            image = image.clamp(0.0, 1.0)
        out[name] = image.contiguous()
    return out
