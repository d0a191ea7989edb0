"""Noise schedules for Gaussian diffusion: pure functions returning the betas of the forward process.

Both return `(num_timesteps,)` **float64** tensors on the CPU: the cumulative products and square roots a
diffusion model derives from them lose precision in float32 over a thousand steps, so derive in float64
and cast the results (`GaussianDiffusion` keeps float32 buffers computed this way).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _check_num_timesteps(num_timesteps: object) -> int:
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be an int >= 1, got {num_timesteps!r}")
    return num_timesteps


def linear_beta_schedule(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> Tensor:
    """DDPM's linear schedule (Ho et al. 2020): betas evenly spaced from `beta_start` to `beta_end`. -> (T,) float64.

    The same betas as diffusers' `beta_schedule="linear"` (`torch.linspace(beta_start, beta_end, T)`, there in
    float32). Unlike lucidrains' `linear_beta_schedule`, the end points are *not* rescaled by 1000 / T: with
    the defaults and T << 1000 the last step is far from pure noise (T = 100 keeps alphas_cumprod[-1] ~ 0.36),
    so for short chains pass `beta_end=2e-2 * 1000 / T` (and `beta_start` likewise) or use the cosine schedule.
    """
    _check_num_timesteps(num_timesteps)
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(f"beta_start and beta_end must satisfy 0 < beta_start <= beta_end < 1, "
                         f"got beta_start={beta_start!r}, beta_end={beta_end!r}")
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def cosine_beta_schedule(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Improved DDPM's cosine schedule (Nichol & Dhariwal 2021). -> (T,) float64.

    alphas_cumprod follows f(t) = cos(((t / T) + s) / (1 + s) * pi / 2)^2, and
    beta_i = min(1 - f(i + 1) / f(i), max_beta): the cap keeps the last step from destroying the signal in
    one jump (beta -> 1 as t -> T). With the default `s` these are diffusers' `betas_for_alpha_bar(T)` /
    `beta_schedule="squaredcos_cap_v2"` (there cast to float32).
    """
    _check_num_timesteps(num_timesteps)
    if not s >= 0.0:
        raise ValueError(f"s must be >= 0 (the offset that keeps beta_0 away from 0), got {s!r}")
    if not 0.0 < max_beta <= 1.0:
        raise ValueError(f"max_beta must lie in (0, 1], got {max_beta!r}")
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps  # (T + 1,) in [0, 1]
    f = torch.cos((steps + s) / (1.0 + s) * (math.pi / 2)) ** 2
    return (1.0 - f[1:] / f[:-1]).clamp(max=max_beta)
