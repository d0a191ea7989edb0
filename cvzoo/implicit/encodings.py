"""Input encodings for coordinate networks, and the ReLU MLP that uses them (the non-SIREN alternative).

- `PositionalEncoding` (NeRF, Mildenhall et al. 2020): `[x, sin(2^0 pi x), cos(2^0 pi x), ...,
  sin(2^(L-1) pi x), cos(2^(L-1) pi x)]`. Convention: the frequencies include pi, so with x in [-1, 1] the
  lowest band has one period over the range, as in the NeRF paper's gamma(p). (nerf-pytorch's `get_embedder`
  omits pi: pass `include_pi=False` for its numbers.) Output features are ordered frequency-major, then
  sin before cos, then the input dimension: `[sin(f_0 x_0..x_{d-1}), cos(f_0 x_0..x_{d-1}), sin(f_1 x), ...]`.
- `FourierFeatures` (Tancik et al. 2020, "Fourier features let networks learn high frequency functions"):
  `[cos(2 pi B x), sin(2 pi B x)]` with `B ~ N(0, scale^2)` of shape (mapping_size, in_features), a buffer
  (or a parameter with `learnable=True`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from cvzoo.implicit.siren import _check_mlp_sizes, _check_positive_float, _check_positive_int


def _check_last_dim(name: str, x: Tensor, size: int) -> None:
    if not isinstance(x, Tensor) or x.ndim < 1 or x.shape[-1] != size:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a tensor of shape (..., {size}), got {got}")


class PositionalEncoding(nn.Module):
    """(..., in_features) -> (..., out_features), out = in * (include_input + 2 * num_frequencies).

    Frequencies `2^k * pi` for k = 0..L-1 (`log_sampling=True`), or L frequencies evenly spaced between
    `2^0 pi` and `2^(L-1) pi` (`log_sampling=False`, as nerf-pytorch's `log_sampling=False`). They are a
    non-persistent buffer (derived from the arguments).
    """

    def __init__(self, num_frequencies: int = 10, *, in_features: int = 3, include_input: bool = True,
                 log_sampling: bool = True, include_pi: bool = True) -> None:
        super().__init__()
        _check_positive_int("num_frequencies", num_frequencies, minimum=0)
        _check_positive_int("in_features", in_features)
        if num_frequencies == 0 and not include_input:
            raise ValueError("num_frequencies=0 with include_input=False encodes nothing: set one of them")
        self.in_features = in_features
        self.num_frequencies = num_frequencies
        self.include_input = include_input
        self.out_features = in_features * (int(include_input) + 2 * num_frequencies)
        top = num_frequencies - 1
        if log_sampling:
            freqs = 2.0 ** torch.arange(num_frequencies, dtype=torch.float32)
        else:
            freqs = torch.linspace(1.0, 2.0 ** max(top, 0), num_frequencies)
        self.register_buffer("frequencies", freqs * (math.pi if include_pi else 1.0), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        _check_last_dim("x", x, self.in_features)
        parts = [x] if self.include_input else []
        if self.num_frequencies:
            scaled = x[..., None, :] * self.frequencies[:, None].to(x.dtype)  # (..., L, d)
            enc = torch.stack([torch.sin(scaled), torch.cos(scaled)], dim=-2)  # (..., L, 2, d)
            parts.append(enc.flatten(-3))  # (..., L * 2 * d), frequency-major, sin then cos
        return torch.cat(parts, dim=-1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_frequencies={self.num_frequencies}, " \
               f"out_features={self.out_features}"


class FourierFeatures(nn.Module):
    """(..., in_features) -> (..., 2 * mapping_size): `[cos(2 pi x B^T), sin(2 pi x B^T)]`, B ~ N(0, scale^2).

    `scale` sets the bandwidth (Tancik et al. use 10 for 2-D images with coordinates in [0, 1]; halve it for
    [-1, 1]). `include_input` appends x itself. `learnable=True` makes B a parameter, otherwise it is a
    persistent buffer (random, so it must be saved with the weights).
    """

    def __init__(self, in_features: int = 2, mapping_size: int = 256, scale: float = 10.0, *,
                 learnable: bool = False, include_input: bool = False,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        _check_positive_int("in_features", in_features)
        _check_positive_int("mapping_size", mapping_size)
        _check_positive_float("scale", scale)
        self.in_features = in_features
        self.mapping_size = mapping_size
        self.include_input = include_input
        self.out_features = 2 * mapping_size + (in_features if include_input else 0)
        b = torch.randn(mapping_size, in_features, generator=generator) * scale
        if learnable:
            self.B = nn.Parameter(b)
        else:
            self.register_buffer("B", b)

    def forward(self, x: Tensor) -> Tensor:
        _check_last_dim("x", x, self.in_features)
        proj = 2 * math.pi * x @ self.B.to(x.dtype).T  # (..., mapping_size)
        parts = [torch.cos(proj), torch.sin(proj)] + ([x] if self.include_input else [])
        return torch.cat(parts, dim=-1)


class CoordinateMLP(nn.Module):
    """(..., in_features) -> (..., out_features): an optional encoding, then a ReLU MLP.

    `encoding` is any module with an `out_features` attribute (`PositionalEncoding`, `FourierFeatures`), or None
    for the plain MLP on raw coordinates (the baseline that cannot fit high frequencies, the "spectral bias").
    `hidden_layers` counts the hidden-to-hidden layers, as `SIREN`'s does.
    """

    def __init__(self, in_features: int = 2, hidden_features: int = 256, hidden_layers: int = 3,
                 out_features: int = 3, *, encoding: nn.Module | None = None,
                 activation: Callable[[], nn.Module] = nn.ReLU) -> None:
        super().__init__()
        _check_mlp_sizes(in_features, hidden_features, hidden_layers, out_features)
        self.in_features, self.out_features = in_features, out_features
        if encoding is not None:
            if getattr(encoding, "in_features", in_features) != in_features:
                raise ValueError(f"encoding takes {encoding.in_features} features but in_features={in_features}")
            if not isinstance(getattr(encoding, "out_features", None), int):
                raise ValueError(f"encoding must have an int out_features attribute, got {type(encoding).__name__}")
        self.encoding = encoding if encoding is not None else nn.Identity()
        width = encoding.out_features if encoding is not None else in_features
        layers: list[nn.Module] = [nn.Linear(width, hidden_features), activation()]
        for _ in range(hidden_layers):
            layers += [nn.Linear(hidden_features, hidden_features), activation()]
        layers.append(nn.Linear(hidden_features, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, coords: Tensor) -> Tensor:
        _check_last_dim("coords", coords, self.in_features)
        return self.net(self.encoding(coords))
