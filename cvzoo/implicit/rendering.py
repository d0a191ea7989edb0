"""Volume rendering for NeRF: rays from cameras, stratified and hierarchical samples along them, compositing.

Camera convention (NeRF / OpenGL, as nerf-pytorch's `get_rays`): in camera space x points right, y up, and the
camera looks down -z. `camera_to_world` is a (..., 3, 4) or (..., 4, 4) matrix `[R | t]` whose columns are the
camera's x, y, z axes and its centre in world space. A pixel (row i, column j) of an H x W image is sampled at
its centre: camera-space direction `((j + 0.5 - W/2) / focal, -(i + 0.5 - H/2) / focal, -1)` (nerf-pytorch
samples the pixel corner, `j - W/2`). Directions are not normalised: their camera-space z is -1, so the
distance parameter `z` of a point `o + z d` is its depth along the camera axis, and `volume_render` scales the
sample spacing by |d|.

Sampling and compositing follow nerf-pytorch (`render_rays`, `sample_pdf`, `raw2outputs`): the last sample's
interval is 1e10 long, so a ray whose last sample has density is opaque there.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from cvzoo.implicit.siren import _check_positive_int


def _check_near_far(near: float, far: float) -> None:
    for name, value in (("near", near), ("far", far)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if not near < far:
        raise ValueError(f"near must be < far, got near={near!r}, far={far!r}")


def _check_rays(origins: Tensor, directions: Tensor) -> None:
    for name, t in (("origins", origins), ("directions", directions)):
        if not isinstance(t, Tensor) or t.ndim < 1 or t.shape[-1] != 3:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a tensor of shape (..., 3), got {got}")
    if origins.shape != directions.shape:
        raise ValueError(f"origins and directions must have the same shape, got {tuple(origins.shape)} and "
                         f"{tuple(directions.shape)}")


def get_rays(height: int, width: int, focal: float, camera_to_world: Tensor) -> tuple[Tensor, Tensor]:
    """(..., 3|4, 4) camera-to-world -> (origins (..., H, W, 3), directions (..., H, W, 3)) in world space.

    Batched over any leading camera dimensions; see the module docstring for the convention."""
    _check_positive_int("height", height)
    _check_positive_int("width", width)
    if isinstance(focal, bool) or not isinstance(focal, (int, float)) or not focal > 0 or not math.isfinite(focal):
        raise ValueError(f"focal must be a positive finite number (in pixels), got {focal!r}")
    c2w = camera_to_world
    if not isinstance(c2w, Tensor) or c2w.ndim < 2 or c2w.shape[-2] not in (3, 4) or c2w.shape[-1] != 4:
        got = tuple(c2w.shape) if isinstance(c2w, Tensor) else type(c2w).__name__
        raise ValueError(f"camera_to_world must have shape (..., 3, 4) or (..., 4, 4), got {got}")
    dtype = c2w.dtype if c2w.is_floating_point() else torch.float32
    c2w = c2w.to(dtype)
    j = torch.arange(width, device=c2w.device, dtype=dtype) + 0.5
    i = torch.arange(height, device=c2w.device, dtype=dtype) + 0.5
    ii, jj = torch.meshgrid(i, j, indexing="ij")  # (H, W)
    dirs = torch.stack([(jj - width / 2) / focal, -(ii - height / 2) / focal, -torch.ones_like(ii)], dim=-1)
    rot = c2w[..., :3, :3]  # (..., 3, 3)
    directions = torch.einsum("...ij,hwj->...hwi", rot, dirs)  # (..., H, W, 3)
    origins = c2w[..., None, None, :3, 3].expand_as(directions)  # (..., H, W, 3)
    return origins, directions


def sample_stratified(origins: Tensor, directions: Tensor, near: float, far: float, num_samples: int,
                      perturb: bool = True, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(..., 3) rays -> (points (..., S, 3), z_vals (..., S)): S distances from near to far, sorted.

    Without `perturb` they are `linspace(near, far, S)`; with it, each is drawn uniformly in its stratum, the
    interval between the midpoints around it (clipped to [near, far]), as nerf-pytorch does."""
    _check_rays(origins, directions)
    _check_near_far(near, far)
    _check_positive_int("num_samples", num_samples)
    t = torch.linspace(0.0, 1.0, num_samples, device=origins.device, dtype=origins.dtype)
    z = (near * (1.0 - t) + far * t).expand(*origins.shape[:-1], num_samples)  # (..., S)
    if perturb:
        mids = 0.5 * (z[..., 1:] + z[..., :-1])
        upper = torch.cat([mids, z[..., -1:]], dim=-1)
        lower = torch.cat([z[..., :1], mids], dim=-1)
        u = torch.rand(z.shape, device=z.device, dtype=z.dtype, generator=generator)
        z = lower + (upper - lower) * u
    points = origins[..., None, :] + directions[..., None, :] * z[..., :, None]  # (..., S, 3)
    return points, z.contiguous()


def sample_pdf(bins: Tensor, weights: Tensor, num_samples: int, deterministic: bool = False,
               generator: torch.Generator | None = None) -> Tensor:
    """bins (..., B + 1), weights (..., B) -> samples (..., N): inverse-transform sampling of the piecewise-constant
    density with mass `weights` on each bin (nerf-pytorch's `sample_pdf`).

    1e-5 is added to the weights (no zero-mass pdf, no NaN); `deterministic` uses the quantiles
    `u = linspace(0, 1, N)`, otherwise u ~ U(0, 1). Not differentiable in `weights` (NeRF detaches the samples)."""
    _check_positive_int("num_samples", num_samples)
    if not isinstance(bins, Tensor) or not isinstance(weights, Tensor) or bins.ndim < 1 \
            or bins.shape[:-1] != weights.shape[:-1] or bins.shape[-1] != weights.shape[-1] + 1 \
            or weights.shape[-1] < 1:
        got = (tuple(bins.shape), tuple(weights.shape)) if isinstance(bins, Tensor) and isinstance(weights, Tensor) \
            else (type(bins).__name__, type(weights).__name__)
        raise ValueError(f"bins and weights must have shapes (..., B + 1) and (..., B) with B >= 1, got {got}")
    weights = weights.detach() + 1e-5
    pdf = weights / weights.sum(dim=-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[..., :1]), torch.cumsum(pdf, dim=-1)], dim=-1)  # (..., B + 1)
    shape = (*cdf.shape[:-1], num_samples)
    if deterministic:
        u = torch.linspace(0.0, 1.0, num_samples, device=cdf.device, dtype=cdf.dtype).expand(shape)
    else:
        u = torch.rand(shape, device=cdf.device, dtype=cdf.dtype, generator=generator)
    u = u.contiguous()
    idx = torch.searchsorted(cdf.contiguous(), u, right=True)  # (..., N), cdf[idx - 1] <= u < cdf[idx]
    below = (idx - 1).clamp(min=0)
    above = idx.clamp(max=cdf.shape[-1] - 1)
    cdf_lo, cdf_hi = cdf.gather(-1, below), cdf.gather(-1, above)
    bins = bins.detach()
    bin_lo, bin_hi = bins.gather(-1, below), bins.gather(-1, above)
    denom = cdf_hi - cdf_lo
    denom = torch.where(denom < 1e-5, torch.ones_like(denom), denom)
    frac = (u - cdf_lo) / denom
    return bin_lo + frac * (bin_hi - bin_lo)


def sample_hierarchical(z_vals: Tensor, weights: Tensor, num_samples: int, perturb: bool = True,
                        generator: torch.Generator | None = None) -> Tensor:
    """Coarse z_vals (..., S) and their weights (..., S) -> the sorted union (..., S + N) with N samples drawn
    from the coarse weights between the coarse midpoints (NeRF's fine pass; the end samples' weights are left
    out, as in nerf-pytorch)."""
    if z_vals.shape != weights.shape or z_vals.shape[-1] < 3:
        raise ValueError(f"z_vals and weights must have the same shape (..., S) with S >= 3, got "
                         f"{tuple(z_vals.shape)} and {tuple(weights.shape)}")
    mids = 0.5 * (z_vals[..., 1:] + z_vals[..., :-1])  # (..., S - 1)
    fine = sample_pdf(mids, weights[..., 1:-1], num_samples, deterministic=not perturb, generator=generator)
    return torch.sort(torch.cat([z_vals, fine.detach()], dim=-1), dim=-1).values


class RenderOutput(NamedTuple):
    rgb: Tensor  # (..., 3) composited colour
    depth: Tensor  # (..., ) expected z (sum of weights * z_vals)
    acc: Tensor  # (..., ) accumulated opacity, sum of the weights, in [0, 1]
    weights: Tensor  # (..., S) each sample's contribution, T_i * alpha_i


def volume_render(rgb: Tensor, sigma: Tensor, z_vals: Tensor, directions: Tensor,
                  white_background: bool = False) -> RenderOutput:
    """rgb (..., S, 3), sigma (..., S) >= 0, z_vals (..., S) sorted, directions (..., 3) -> `RenderOutput`.

    `delta_i = (z_{i+1} - z_i) |d|` (the last 1e10), `alpha_i = 1 - exp(-sigma_i delta_i)`, transmittance
    `T_i = prod_{j<i} (1 - alpha_j)` (an exclusive cumulative product), `w_i = T_i alpha_i`,
    colour `sum_i w_i c_i` (plus `1 - acc` of white with `white_background`)."""
    if rgb.shape[:-1] != sigma.shape or rgb.shape[-1] != 3 or sigma.shape != z_vals.shape \
            or directions.shape != (*sigma.shape[:-1], 3):
        raise ValueError(f"expected rgb (..., S, 3), sigma (..., S), z_vals (..., S) and directions (..., 3), got "
                         f"{tuple(rgb.shape)}, {tuple(sigma.shape)}, {tuple(z_vals.shape)}, "
                         f"{tuple(directions.shape)}")
    deltas = z_vals[..., 1:] - z_vals[..., :-1]
    deltas = torch.cat([deltas, torch.full_like(deltas[..., :1], 1e10)], dim=-1)  # (..., S)
    deltas = deltas * directions.norm(dim=-1, keepdim=True)
    alpha = 1.0 - torch.exp(-sigma * deltas)
    # exclusive cumprod of (1 - alpha), the 1e-10 as nerf-pytorch: keeps the gradient finite at alpha = 1
    trans = torch.cumprod(torch.cat([torch.ones_like(alpha[..., :1]), 1.0 - alpha + 1e-10], dim=-1), dim=-1)
    weights = alpha * trans[..., :-1]  # (..., S)
    rgb_map = (weights[..., None] * rgb).sum(dim=-2)  # (..., 3)
    depth = (weights * z_vals).sum(dim=-1)
    acc = weights.sum(dim=-1)
    if white_background:
        rgb_map = rgb_map + (1.0 - acc[..., None])
    return RenderOutput(rgb_map, depth, acc, weights)
