"""Priors per pyramid level: anchor boxes and anchor-free points.

Rows are ordered (level, y, x, anchor), exactly as dense heads flatten their outputs.
Both are computed from feature-map sizes and declared strides; pure tensor code, compile-clean.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def retinanet_anchor_sizes(base_sizes: Sequence[int] = (32, 64, 128, 256, 512),
                           octaves: int = 3) -> tuple[tuple[int, ...], ...]:
    """RetinaNet's per-level sizes: base * 2**(i / octaves), truncated to int as torchvision does."""
    return tuple(tuple(int(s * 2 ** (i / octaves)) for i in range(octaves)) for s in base_sizes)


class AnchorGenerator(nn.Module):
    """Anchor boxes: [(H_l, W_l)] feature sizes -> (R, 4) xyxy, R = sum_l H_l * W_l * A.

    `sizes[l]` lists the anchor sizes (sqrt of area) of level l, `aspect_ratios` (h / w) are shared
    and `scales` multiply every size. Per location anchors are ordered ratio-major, size-minor, base
    anchors are rounded to integers and centred at (x + offset) * stride: torchvision's conventions
    (offset 0), so anchors equal torchvision's `AnchorGenerator` when image sizes are divisible by
    the strides.
    """

    def __init__(
        self,
        sizes: Sequence[Sequence[float]],
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        strides: Sequence[int] = (8, 16, 32, 64, 128),
        scales: Sequence[float] = (1.0,),
        offset: float = 0.0,
    ) -> None:
        super().__init__()
        if len(sizes) != len(strides):
            raise ValueError(f"sizes gives {len(sizes)} levels but strides {len(strides)}: {tuple(strides)}")
        if not aspect_ratios or any(r <= 0 for r in aspect_ratios):
            raise ValueError(f"aspect_ratios must be positive, got {tuple(aspect_ratios)}")
        self.strides = tuple(int(s) for s in strides)
        self.offset = offset
        base = []
        for level_sizes in sizes:
            s = torch.tensor([float(x) * sc for x in level_sizes for sc in scales])
            r = torch.tensor([float(a) for a in aspect_ratios])
            h_ratios = torch.sqrt(r)
            ws = (1 / h_ratios[:, None] * s[None, :]).reshape(-1)  # ratio-major
            hs = (h_ratios[:, None] * s[None, :]).reshape(-1)
            base.append((torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round())
        if len({b.shape[0] for b in base}) != 1:
            raise ValueError("every level needs the same number of anchors per location")
        self.num_anchors = base[0].shape[0]
        self.register_buffer("base_anchors", torch.stack(base), persistent=False)  # (L, A, 4)

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    def forward(self, sizes: Sequence[tuple[int, int]], device=None, dtype=torch.float32) -> Tensor:
        device = self.base_anchors.device if device is None else device
        return _grid_priors_of(sizes, self.strides, self.offset, self.base_anchors.to(device, dtype))[0]


class PointGenerator(nn.Module):
    """Anchor-free points: [(H_l, W_l)] -> points (R, 2) xy and their strides (R,), R = sum_l H_l * W_l.

    Points sit at (x + offset) * stride; offset 0.5 puts them at cell centres (FCOS paper, MMDetection),
    offset 0 at cell corners (torchvision's FCOS).
    """

    def __init__(self, strides: Sequence[int] = (8, 16, 32, 64, 128), offset: float = 0.5) -> None:
        super().__init__()
        self.strides = tuple(int(s) for s in strides)
        self.offset = offset
        self.num_anchors = 1

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    def forward(self, sizes: Sequence[tuple[int, int]], device=None, dtype=torch.float32) -> tuple[Tensor, Tensor]:
        if torch.compiler.is_compiling():
            no_offsets = torch.zeros(self.num_levels, 1, 2, device=device, dtype=dtype)
            return _grid_priors_of(sizes, self.strides, self.offset, no_offsets)
        points, _, strides = grid_centres(sizes, self.strides, self.offset, device, dtype, with_strides=True)
        return points, strides


def grid_centres(sizes: Sequence[tuple[int, int]], strides: Sequence[int], offset: float, device,
                 dtype: torch.dtype, with_strides: bool = False) -> tuple[Tensor, ...]:
    """Cell centres (x + offset, y + offset) * stride of every level at once: (sum_l H_l W_l, 2) xy and the
    (sum_l H_l W_l,) level of each row, rows ordered (level, y, x); with `with_strides` also each row's stride
    (sum_l H_l W_l,) in `dtype`.

    One flat arange and a few gathers instead of a grid per level: a handful of operations whatever
    the number of levels (dispatch overhead is what dominates small grids).
    """
    counts = [h * w for h, w in sizes]
    starts = [sum(counts[:i]) for i in range(len(counts))]
    # per-level constants, gathered by each row's level: start, width, stride. The index arithmetic runs on
    # float32 integers (exact below 2^24 rows), so no integer -> float conversions follow
    # (3, L): indexing columns gives (3, N) rows that are contiguous
    table = torch.tensor([starts, [w for _, w in sizes], list(strides)], device=device, dtype=torch.float32)
    index = torch.arange(sum(counts), device=device, dtype=torch.float32)
    level = torch.bucketize(index, torch.tensor(starts, device=device, dtype=torch.float32), right=True) - 1
    start, width, stride = table[:, level].unbind(0)
    local = index - start
    yx = torch.stack([local % width, torch.div(local, width, rounding_mode="floor")], dim=-1)  # (N, 2) as x, y
    centres = (yx + offset) * stride[:, None]
    if dtype != torch.float32:
        centres, stride = centres.to(dtype), stride.to(dtype)
    return (centres, level, stride) if with_strides else (centres, level)


def grid_priors(sizes: list[int], strides: list[int], offset: float, base: Tensor) -> tuple[Tensor, Tensor]:
    """Priors of every level: `sizes` flat (H_0, W_0, H_1, W_1, ...), `base` (L, A, D) offsets from each
    cell centre (anchor corners, D = 4; zeros with D = 2 for points) -> (R, D) priors, rows (level, y, x, a),
    R = sum_l H_l W_l A, and the (sum_l H_l W_l,) stride of each cell."""
    pairs = list(zip(sizes[0::2], sizes[1::2]))
    centres, level, stride = grid_centres(pairs, strides, offset, base.device, base.dtype, with_strides=True)
    d = base.shape[-1]
    priors = centres.repeat(1, d // 2)[:, None, :] + base[level]  # (HW_all, A, D)
    return priors.reshape(-1, d), stride


def _grid_priors_fresh(sizes: list[int], strides: list[int], offset: float, base: Tensor) -> tuple[Tensor, Tensor]:
    priors, stride = grid_priors(sizes, strides, offset, base)
    return priors, stride.clone()  # an operator's outputs own their storage (stride is a view of a table)


def _grid_priors_fake(sizes: list[int], strides: list[int], offset: float, base: Tensor) -> tuple[Tensor, Tensor]:
    cells = sum(h * w for h, w in zip(sizes[0::2], sizes[1::2]))
    return base.new_empty(cells * base.shape[1], base.shape[2]), base.new_empty(cells)


# Under torch.compile the priors are computed by an operator the compiler does not see into. Inlined, their
# index arithmetic (row -> level, y, x, anchor: integer divisions and remainders) lands in the innermost loop
# of every consumer, the (B, M, R) IoU of the assigners among them, where inductor's CPU backend then emits
# scalar code and writes the IoU's parts to memory: at batch 16 with 64 boxes the compiled MaxIoU assignment
# took 95 ms with inlined anchors and 34 ms with them computed once. Eager calls skip the wrapper.
if hasattr(torch.library, "custom_op"):  # torch >= 2.4
    _opaque_grid_priors = torch.library.custom_op(
        "cvzoo::grid_priors", _grid_priors_fresh, mutates_args=(),
        schema="(SymInt[] sizes, int[] strides, float offset, Tensor base) -> (Tensor, Tensor)")
    _opaque_grid_priors.register_fake(_grid_priors_fake)
else:
    _opaque_grid_priors = grid_priors


def _grid_priors_of(sizes: Sequence[tuple[int, int]], strides: Sequence[int], offset: float,
                    base: Tensor) -> tuple[Tensor, Tensor]:
    flat = [x for hw in sizes for x in hw]
    fn = _opaque_grid_priors if torch.compiler.is_compiling() else grid_priors
    return fn(flat, list(strides), float(offset), base)
