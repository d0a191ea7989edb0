"""Fitting one image with a coordinate network: `ImplicitImage` (coordinates -> RGB) and `fit_image`.

Coordinate convention: pixel (row i, column j) of an H x W image sits at `(x, y) = (linspace(-1, 1, W)[j],
linspace(-1, 1, H)[i])`, x to the right, y down, corners at exactly +-1 (SIREN's `get_mgrid`, which orders
the pair (row, column) instead). Pixels are listed row-major, so `rgb.reshape(H, W, 3)` is the image.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvzoo.implicit.siren import SIREN, _check_positive_float, _check_positive_int


def coordinate_grid(height: int, width: int, *, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """() -> (H * W, 2): the (x, y) coordinates in [-1, 1] of an image's pixels, row-major (module docstring)."""
    _check_positive_int("height", height)
    _check_positive_int("width", width)
    ys = torch.linspace(-1.0, 1.0, height, device=device, dtype=dtype) if height > 1 \
        else torch.zeros(1, device=device, dtype=dtype)
    xs = torch.linspace(-1.0, 1.0, width, device=device, dtype=dtype) if width > 1 \
        else torch.zeros(1, device=device, dtype=dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) each
    return torch.stack([grid_x, grid_y], dim=-1).reshape(-1, 2)  # (H * W, 2)


def psnr(prediction: Tensor, target: Tensor, max_value: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio in dB, `10 log10(max^2 / mse)`, over all elements; a scalar tensor.

    The MSE is clamped at 1e-10 (100 dB for max 1) so a perfect fit gives a finite number."""
    mse = F.mse_loss(prediction.float(), target.float())
    return 10.0 * torch.log10(max_value ** 2 / mse.clamp(min=1e-10))


class ImplicitImage(nn.Module):
    """A coordinate network fitted to one H x W image: `forward(coords (N, 2)) -> rgb (N, C)`.

    `network` is any module mapping (N, 2) coordinates to (N, C) colours (`SIREN`, `CoordinateMLP`); its output
    is compared with colours in [0, 1] as it is (no squashing, as in the SIREN paper, which fits [-1, 1]).
    `coords` is the (H * W, 2) pixel grid (a non-persistent buffer, see `coordinate_grid`).
    """

    def __init__(self, network: nn.Module, height: int = 128, width: int = 128, *, channels: int = 3) -> None:
        super().__init__()
        _check_positive_int("height", height)
        _check_positive_int("width", width)
        _check_positive_int("channels", channels)
        out = getattr(network, "out_features", channels)
        if out != channels:
            raise ValueError(f"network has out_features={out} but channels={channels}")
        self.network = network
        self.height, self.width, self.channels = height, width, channels
        self.register_buffer("coords", coordinate_grid(height, width), persistent=False)

    def _check_coords(self, coords: object) -> Tensor:
        if not isinstance(coords, Tensor) or coords.ndim < 1 or coords.shape[-1] != 2:
            got = tuple(coords.shape) if isinstance(coords, Tensor) else type(coords).__name__
            raise ValueError(f"coords must be a tensor of shape (N, 2) of (x, y) in [-1, 1], got {got}")
        return coords

    def forward(self, coords: Tensor) -> Tensor:
        """(N, 2) -> (N, C)."""
        return self.network(self._check_coords(coords))

    def loss(self, coords: Tensor, rgb: Tensor) -> dict[str, Tensor]:
        """coords (N, 2), rgb (N, C) in [0, 1] -> {"loss": mse, "psnr": dB}."""
        pred = self(coords)
        if not isinstance(rgb, Tensor) or rgb.shape != pred.shape:
            got = tuple(rgb.shape) if isinstance(rgb, Tensor) else type(rgb).__name__
            raise ValueError(f"rgb must have shape {tuple(pred.shape)} (one colour per coordinate), got {got}")
        mse = F.mse_loss(pred.float(), rgb.float())
        return {"loss": mse, "psnr": 10.0 * torch.log10(1.0 / mse.detach().clamp(min=1e-10))}

    @torch.no_grad()
    def render(self, chunk: int = 65536) -> Tensor:
        """() -> (C, H, W): the network evaluated on the pixel grid, clamped to [0, 1]."""
        _check_positive_int("chunk", chunk)
        out = torch.cat([self.network(c) for c in self.coords.split(chunk)])  # (H * W, C)
        return out.clamp(0.0, 1.0).T.reshape(self.channels, self.height, self.width)

    @staticmethod
    def targets(image: Tensor) -> tuple[Tensor, Tensor]:
        """(C, H, W) image -> (coords (H * W, 2), colours (H * W, C)), the pixels in `coords` order."""
        if not isinstance(image, Tensor) or image.ndim != 3:
            got = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(f"image must be a (C, H, W) tensor, got {got}")
        c, h, w = image.shape
        return coordinate_grid(h, w, device=image.device), image.reshape(c, h * w).T.contiguous()


class FitResult(NamedTuple):
    model: ImplicitImage
    psnr: float  # of the clamped render against the image, in dB
    steps: int
    seconds: float  # wall time of the training loop
    history: list  # the trainer's logged records


class _RepeatBatch:
    """An epoch of one full batch (coords, rgb): what the trainer iterates when fitting one image."""

    def __init__(self, coords: Tensor, rgb: Tensor) -> None:
        self.batch = (coords, rgb)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        yield self.batch

    def __len__(self) -> int:
        return 1


def fit_image(image: Tensor, network: nn.Module | None = None, *, steps: int = 200, lr: float = 1e-3,
              schedule: str = "cosine", device: str | torch.device = "cpu", progress: bool = False,
              log_every: int = 50) -> FitResult:
    """Fits `network` (default: the paper's `SIREN()`, 256 x 3 hidden) to a (C, H, W) image in [0, 1] with
    full-batch Adam through `cvzoo.train.Trainer` (every step sees every pixel) with a cosine schedule, and
    returns the model, the PSNR of its clamped render, the step count and the training time. lr 1e-3 with the
    cosine decay fits faster than the paper's constant 1e-4 (128 px astronaut: 35 dB after 100 steps)."""
    from cvzoo.train import Trainer  # the trainer sits above the parts; imported only to fit

    if not isinstance(image, Tensor) or image.ndim != 3:
        got = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"image must be a (C, H, W) tensor in [0, 1], got {got}")
    _check_positive_int("steps", steps)
    _check_positive_float("lr", lr)
    c, h, w = image.shape
    network = network if network is not None else SIREN(2, 256, 3, c)
    model = ImplicitImage(network, h, w, channels=c)
    coords, rgb = ImplicitImage.targets(image.float())
    trainer = Trainer(model, optimizer=lambda m: torch.optim.Adam(m.parameters(), lr=lr), lr=lr, max_steps=steps,
                      schedule=schedule, device=device, progress=progress, log_every=log_every, weight_decay=0.0)
    start = time.perf_counter()
    trainer.fit(_RepeatBatch(coords, rgb))
    seconds = time.perf_counter() - start
    model.eval()
    value = float(psnr(model.render(), image.to(model.coords.device)))
    return FitResult(model, value if math.isfinite(value) else float("nan"), trainer.step, seconds, trainer.history)
