"""SIREN: sinusoidal representation networks (Sitzmann et al., 2020), with the paper's initialisation.

A `SineLayer` computes `sin(omega_0 * (W x + b))`. The initialisation (the official `explore_siren` code):

- first layer: `W ~ U(-1/in, 1/in)`, so `omega_0 * W x` spans several periods of the sine for x in [-1, 1];
- other layers: `W ~ U(-sqrt(6/in)/omega_0, sqrt(6/in)/omega_0)`, so `omega_0 * W` is U(-c, c) with
  c = sqrt(6/in): its variance 2/in times `in` inputs of variance 1/2 (arcsine distributed sines) gives
  pre-activations `omega_0 * (W x + b)` of variance 1 (approximately standard normal, by the central limit theorem);
- the final linear layer of `SIREN(outermost_linear=True)` uses the hidden layers' bound.

Biases: the official code leaves PyTorch's default `U(-1/sqrt(in), 1/sqrt(in))`, which, multiplied by omega_0 = 30,
adds a variance of 300/in to the pre-activations (1.2 for in = 256), so the standard-normal claim does not hold
with it. Here the biases are drawn from the same interval as the weights (as in lucidrains' siren-pytorch), which
adds only 2/in: `bias_init="torch"` restores the official code's default.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _check_positive_int(name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_mlp_sizes(in_features: object, hidden_features: object, hidden_layers: object,
                     out_features: object) -> None:
    """The four sizes every coordinate MLP here takes (`SIREN`, `CoordinateMLP`); hidden_layers may be 0."""
    _check_positive_int("in_features", in_features)
    _check_positive_int("hidden_features", hidden_features)
    _check_positive_int("hidden_layers", hidden_layers, minimum=0)
    _check_positive_int("out_features", out_features)


def _check_positive_float(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def siren_weight_bound(in_features: int, omega_0: float, is_first: bool) -> float:
    """The half-width c of SIREN's uniform weight init U(-c, c): 1/in for the first layer, sqrt(6/in)/omega_0
    for the others."""
    return 1.0 / in_features if is_first else math.sqrt(6.0 / in_features) / omega_0


class SineLayer(nn.Module):
    """(..., in_features) -> (..., out_features): `sin(omega_0 * (x W^T + b))`, initialised as in the paper.

    `bias_init`: "siren" draws the bias from the weights' interval, "torch" keeps nn.Linear's default (the
    official code's; see the module docstring).
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, is_first: bool = False,
                 omega_0: float = 30.0, bias_init: str = "siren") -> None:
        super().__init__()
        _check_positive_int("in_features", in_features)
        _check_positive_int("out_features", out_features)
        _check_positive_float("omega_0", omega_0)
        if bias_init not in ("siren", "torch"):
            raise ValueError(f"bias_init must be 'siren' or 'torch', got {bias_init!r}")
        self.in_features, self.out_features = in_features, out_features
        self.is_first = is_first
        self.omega_0 = float(omega_0)
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        bound = siren_weight_bound(in_features, self.omega_0, is_first)
        with torch.no_grad():
            self.linear.weight.uniform_(-bound, bound)
            if bias and bias_init == "siren":
                self.linear.bias.uniform_(-bound, bound)

    def preactivation(self, x: Tensor) -> Tensor:
        """(..., in) -> (..., out): `omega_0 * (x W^T + b)`, the input of the sine."""
        return self.omega_0 * self.linear(x)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(self.preactivation(x))

    def extra_repr(self) -> str:
        return f"is_first={self.is_first}, omega_0={self.omega_0}"


class SIREN(nn.Module):
    """(..., in_features) coordinates, nominally in [-1, 1] -> (..., out_features).

    One first `SineLayer` (in -> hidden, `first_omega_0`), `hidden_layers` hidden sine layers (hidden -> hidden,
    `hidden_omega_0`), then a final linear layer (`outermost_linear=True`, initialised with the hidden layers'
    bound) or a final sine layer. The paper's image fits use 256 features, 3 hidden layers, omega_0 = 30.
    """

    def __init__(self, in_features: int = 2, hidden_features: int = 256, hidden_layers: int = 3,
                 out_features: int = 3, *, first_omega_0: float = 30.0, hidden_omega_0: float = 30.0,
                 outermost_linear: bool = True, bias_init: str = "siren") -> None:
        super().__init__()
        _check_mlp_sizes(in_features, hidden_features, hidden_layers, out_features)
        self.in_features, self.out_features = in_features, out_features
        layers: list[nn.Module] = [SineLayer(in_features, hidden_features, is_first=True, omega_0=first_omega_0,
                                             bias_init=bias_init)]
        for _ in range(hidden_layers):
            layers.append(SineLayer(hidden_features, hidden_features, omega_0=hidden_omega_0, bias_init=bias_init))
        if outermost_linear:
            final = nn.Linear(hidden_features, out_features)
            bound = siren_weight_bound(hidden_features, hidden_omega_0, is_first=False)
            with torch.no_grad():
                final.weight.uniform_(-bound, bound)
                if bias_init == "siren":
                    final.bias.uniform_(-bound, bound)
            layers.append(final)
        else:
            layers.append(SineLayer(hidden_features, out_features, omega_0=hidden_omega_0, bias_init=bias_init))
        self.net = nn.Sequential(*layers)

    def forward(self, coords: Tensor) -> Tensor:
        if coords.shape[-1] != self.in_features:
            raise ValueError(f"coords must have shape (..., {self.in_features}), got {tuple(coords.shape)}")
        return self.net(coords)
