"""Projection and prediction heads of self-supervised methods: MLPs on pooled features."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn


class MLPHead(nn.Module):
    """(B, in_dim) -> (B, out_dim): `num_layers` Linear layers, each but the last followed by a norm and ReLU.

    SimCLR / MoCo v2 projection: `MLPHead(d, 2048, 128, num_layers=2)`; BYOL / SimSiam predictor:
    `MLPHead(256, 4096, 256)`; Barlow Twins / VICReg expander: `MLPHead(d, 8192, 8192, num_layers=3)`.
    `last_norm=True` adds an affine-free BatchNorm after the last layer (SimSiam's and MoCo v3's projector).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, *, num_layers: int = 2,
                 norm_layer: Callable[[int], nn.Module] | None = nn.BatchNorm1d, last_norm: bool = False) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        for i in range(num_layers):
            last = i == num_layers - 1
            layers.append(nn.Linear(dims[i], dims[i + 1], bias=last or norm_layer is None))
            if not last:
                if norm_layer is not None:
                    layers.append(norm_layer(dims[i + 1]))
                layers.append(nn.ReLU(inplace=True))
        if last_norm:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        self.net = nn.Sequential(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
