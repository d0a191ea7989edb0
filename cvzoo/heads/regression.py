"""Image-level regression heads: scalar values (a price) and keypoint coordinates (four corners)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from cvzoo.heads.pooling import GlobalPool


class RegressionOutput(NamedTuple):
    values: Tensor  # (B, num_outputs)


class KeypointOutput(NamedTuple):
    points: Tensor  # (B, K, 2): (x, y) as fractions of the input width and height, in [0, 1]


def _mlp(in_channels: int, out_features: int, hidden: int, dropout: float, out_name: str,
         out_value: int) -> nn.Sequential:
    if in_channels < 1:
        raise ValueError(f"in_channels must be positive, got {in_channels}")
    if out_features < 1:
        raise ValueError(f"{out_name} must be positive, got {out_value}")
    if hidden < 0:
        raise ValueError(f"hidden must be >= 0, got {hidden}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
    if hidden == 0:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_channels, out_features))
    return nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(hidden, out_features))


class RegressionHead(nn.Module):
    """Global pool -> MLP -> values. [(B, C, H, W)] -> (B, num_outputs).

    With `value_range=(low, high)` outputs are bounded, low + (high - low) * sigmoid(z), and start
    near the range's midpoint. Unbounded outputs start near 0: scale targets accordingly.
    """

    def __init__(self, in_channels: int, num_outputs: int = 1, value_range: tuple[float, float] | None = None,
                 hidden: int = 0, pool: str = "avg", dropout: float = 0.0, in_index: int = -1) -> None:
        super().__init__()
        if value_range is not None and not (len(value_range) == 2 and value_range[0] < value_range[1]):
            raise ValueError(f"value_range must be (low, high) with low < high, got {value_range!r}")
        self.num_outputs = num_outputs
        self.value_range = None if value_range is None else (float(value_range[0]), float(value_range[1]))
        self.pool = GlobalPool(pool, in_index)
        self.mlp = _mlp(in_channels, num_outputs, hidden, dropout, "num_outputs", num_outputs)

    def forward(self, feats: Sequence[Tensor] | Tensor) -> RegressionOutput:
        z = self.mlp(self.pool(feats))
        if self.value_range is not None:
            low, high = self.value_range
            z = (low + (high - low) * torch.sigmoid(z)).clamp(low, high)  # clamp: float32 rounding at saturation
        return RegressionOutput(z)


class KeypointRegressionHead(nn.Module):
    """Global pool -> MLP -> K points. [(B, C, H, W)] -> (B, K, 2) normalised (x, y) in [0, 1].

    Coordinates are fractions of the input image's width and height (0 = left/top edge, 1 = right/
    bottom edge), through a sigmoid; multiply by (W, H) for pixels.
    """

    def __init__(self, in_channels: int, num_keypoints: int, hidden: int = 256, pool: str = "avg",
                 dropout: float = 0.0, in_index: int = -1) -> None:
        super().__init__()
        if num_keypoints < 1:
            raise ValueError(f"num_keypoints must be positive, got {num_keypoints}")
        self.num_keypoints = num_keypoints
        self.pool = GlobalPool(pool, in_index)
        self.mlp = _mlp(in_channels, 2 * num_keypoints, hidden, dropout, "num_keypoints", num_keypoints)

    def forward(self, feats: Sequence[Tensor] | Tensor) -> KeypointOutput:
        z = self.mlp(self.pool(feats))
        return KeypointOutput(torch.sigmoid(z).reshape(z.shape[0], self.num_keypoints, 2))  # (B, K, 2)
