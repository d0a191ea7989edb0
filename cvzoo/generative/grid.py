"""Sample grids: generated images tiled into one picture and written as a PNG."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import Tensor


def make_grid(samples: Tensor, nrow: int | None = None, padding: int = 2, pad_value: float = 1.0) -> Tensor:
    """(N, C, H, W) images in [0, 1], C in {1, 3} -> one (3, rows * (H + p) + p, nrow * (W + p) + p) image.

    `nrow` images a row (default: the ceiling of sqrt(N), a square-ish grid); grey images are repeated to
    RGB; `padding` pixels of `pad_value` between and around the tiles. Values are clamped to [0, 1].
    """
    if not isinstance(samples, Tensor) or samples.ndim != 4 or samples.shape[1] not in (1, 3):
        shape = tuple(samples.shape) if isinstance(samples, Tensor) else type(samples).__name__
        raise ValueError(f"samples must be a (N, C, H, W) tensor with C 1 or 3, got {shape}")
    if samples.shape[0] == 0:
        raise ValueError("samples is empty; expected at least one image")
    if not samples.is_floating_point():
        raise ValueError(f"samples must be floating images in [0, 1], got dtype {samples.dtype}")
    n, _, h, w = samples.shape
    if nrow is None:
        nrow = math.ceil(math.sqrt(n))
    if isinstance(nrow, bool) or not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"nrow must be a positive integer or None, got {nrow!r}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an integer >= 0, got {padding!r}")
    nrow = min(nrow, n)
    rows = math.ceil(n / nrow)
    images = samples.detach().float().clamp(0, 1).expand(n, 3, h, w).cpu()
    grid = torch.full((3, rows * (h + padding) + padding, nrow * (w + padding) + padding), float(pad_value))
    for i in range(n):  # a picture for people: at most a few hundred tiles
        r, c = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + c * (w + padding)
        grid[:, y:y + h, x:x + w] = images[i]
    return grid


def save_grid(samples: Tensor, path: str | os.PathLike, nrow: int | None = None, padding: int = 2,
              scale: int = 1, pad_value: float = 1.0) -> Path:
    """Writes `make_grid(samples, nrow, padding)` as a PNG at `path` (folders created), each pixel
    repeated `scale` times (small digits are unreadable at 1:1). Returns the path."""
    from PIL import Image

    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    grid = make_grid(samples, nrow, padding, pad_value)
    if scale > 1:
        grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    pixels = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")
    return path
