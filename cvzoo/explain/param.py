"""Image parameterisations for feature visualisation: lucid's Fourier and pixel images, with colour decorrelation.

A parameterisation is an `nn.Module` whose parameters are what the optimiser moves; `forward()` takes no input
and returns images `(B, C, H, W)` in [0, 1]. Both follow lucid (`lucid.optvis.param`): the raw values are mapped
through the square root of ImageNet's colour correlation (`decorrelate=True`, RGB only) and a sigmoid.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

__all__ = [
    "COLOR_CORRELATION_SVD_SQRT",
    "FourierImage",
    "ImageParam",
    "PixelImage",
    "color_correlation_normalized",
    "decorrelate_colors",
    "fft_scale",
    "to_valid_rgb",
]

# lucid/optvis/param/color.py: U sqrt(S) of the SVD of ImageNet's RGB correlation, so M @ M.T is that correlation.
COLOR_CORRELATION_SVD_SQRT: tuple[tuple[float, float, float], ...] = (
    (0.26, 0.09, 0.02),
    (0.27, 0.00, -0.05),
    (0.27, -0.09, 0.03),
)


def color_correlation_normalized(
    dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> Tensor:
    """lucid's decorrelation matrix (3, 3): `COLOR_CORRELATION_SVD_SQRT` over its largest column norm."""
    m = torch.tensor(COLOR_CORRELATION_SVD_SQRT, dtype=torch.float64)
    return (m / torch.linalg.vector_norm(m, dim=0).max()).to(dtype=dtype, device=device)


def decorrelate_colors(t: Tensor) -> Tensor:
    """lucid's `_linear_decorrelate_color`: every pixel's colour vector v -> D @ v. (B, 3, H, W) -> (B, 3, H, W).

    `t` is read as colours in a decorrelated space (independent unit-variance components); D maps them to RGB
    with ImageNet's colour correlation, so an optimiser moving `t` moves along natural colour directions.
    """
    if t.ndim != 4 or t.shape[1] != 3:
        raise ValueError(f"t must be (B, 3, H, W) to decorrelate colours, got shape {tuple(t.shape)}")
    d = color_correlation_normalized(t.dtype, t.device)
    return torch.einsum("ij,bjhw->bihw", d, t)


def to_valid_rgb(t: Tensor, *, decorrelate: bool = True) -> Tensor:
    """Raw parameterisation output -> images in [0, 1]: optional colour decorrelation, then a sigmoid.

    (B, C, H, W) -> (B, C, H, W); C must be 3 when `decorrelate`.
    """
    return torch.sigmoid(decorrelate_colors(t) if decorrelate else t)


def fft_scale(height: int, width: int, decay_power: float = 1.0) -> Tensor:
    """The Fourier spectrum's scale (H, W // 2 + 1): `1 / max(f, 1 / max(H, W)) ** decay_power`.

    `f = sqrt(fy**2 + fx**2)` in cycles per pixel (`torch.fft.fftfreq(H)` down, `rfftfreq(W)` across), so low
    frequencies get large amplitudes (natural images have ~1/f spectra) and the DC term's floor is 1/max(H, W).
    lucid slices `fftfreq(W)[: W // 2 + 2]` for odd widths (then crops its (W+1)-wide image); `rfftfreq` gives the
    exact half spectrum instead.
    """
    fy = torch.fft.fftfreq(height, dtype=torch.float64)[:, None]  # (H, 1)
    fx = torch.fft.rfftfreq(width, dtype=torch.float64)[None, :]  # (1, W // 2 + 1)
    freqs = torch.sqrt(fx**2 + fy**2)
    return (1.0 / freqs.clamp(min=1.0 / max(height, width)) ** decay_power).float()


def _check_size(size: object) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, numbers.Integral) else size
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 1 for s in pair)
    ):
        raise ValueError(f"size must be a positive int or an (H, W) pair of positive ints, got {size!r}")
    return int(pair[0]), int(pair[1])


def _check_positive_int(value: object, name: str) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_positive_float(value: object, name: str) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


class ImageParam(nn.Module):
    """Base class: subclasses implement `spatial()` -> raw (B, C, H, W); `forward()` maps it to [0, 1]."""

    def __init__(self, size: int | tuple[int, int], batch: int, channels: int, decorrelate: bool) -> None:
        super().__init__()
        self.height, self.width = _check_size(size)
        self.batch = _check_positive_int(batch, "batch")
        self.channels = _check_positive_int(channels, "channels")
        if decorrelate and self.channels != 3:
            raise ValueError(f"decorrelate=True needs channels=3 (RGB colour correlation), got channels={channels}")
        self.decorrelate = bool(decorrelate)

    def spatial(self) -> Tensor:
        """The raw image before colour mapping, (B, C, H, W)."""
        raise NotImplementedError

    def forward(self) -> Tensor:
        """() -> images (B, C, H, W) in [0, 1]."""
        return to_valid_rgb(self.spatial(), decorrelate=self.decorrelate)


class FourierImage(ImageParam):
    """lucid's `fft_image`: a learnable half spectrum, scaled by 1/frequency**decay_power, back to pixels.

    `spectrum` is (B, C, H, W // 2 + 1, 2) (real, imaginary), initialised N(0, sd). The raw image is
    `irfft2(fft_scale(H, W) * spectrum, norm="ortho") / 4`; "ortho" equals lucid's `scale * sqrt(H W)` followed by
    TensorFlow's 1/(H W) inverse, and the 1/4 is lucid's. `forward()` -> (B, C, H, W) in [0, 1].
    """

    def __init__(
        self,
        size: int | tuple[int, int],
        batch: int = 1,
        channels: int = 3,
        decay_power: float = 1.0,
        *,
        decorrelate: bool = True,
        sd: float = 0.01,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(size, batch, channels, decorrelate)
        if (not isinstance(decay_power, numbers.Real) or isinstance(decay_power, bool)
                or not math.isfinite(decay_power) or decay_power < 0):
            raise ValueError(f"decay_power must be a finite number >= 0, got {decay_power!r}")
        sd = _check_positive_float(sd, "sd")
        self.decay_power = float(decay_power)
        h, w = self.height, self.width
        init = torch.randn(self.batch, self.channels, h, w // 2 + 1, 2, generator=generator) * sd
        self.spectrum = nn.Parameter(init)
        self.register_buffer("scale", fft_scale(h, w, self.decay_power), persistent=False)  # (H, W // 2 + 1)

    def spatial(self) -> Tensor:
        spectrum = torch.view_as_complex(self.spectrum) * self.scale  # (B, C, H, W // 2 + 1) complex
        return torch.fft.irfft2(spectrum, s=(self.height, self.width), norm="ortho") / 4.0  # (B, C, H, W)


class PixelImage(ImageParam):
    """lucid's `pixel_image`: one learnable value per pixel and channel, N(0, sd) at the start.

    `forward()` -> (B, C, H, W) in [0, 1] (colour decorrelation and sigmoid as for `FourierImage`).
    """

    def __init__(
        self,
        size: int | tuple[int, int],
        batch: int = 1,
        channels: int = 3,
        *,
        decorrelate: bool = True,
        sd: float = 0.01,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(size, batch, channels, decorrelate)
        sd = _check_positive_float(sd, "sd")
        init = torch.randn(self.batch, self.channels, self.height, self.width, generator=generator) * sd
        self.pixels = nn.Parameter(init)

    def spatial(self) -> Tensor:
        return self.pixels
