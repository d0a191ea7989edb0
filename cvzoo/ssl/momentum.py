"""Momentum (EMA) target networks: the momentum schedule and the update, shared by MoCo, BYOL and DINO."""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn


def cosine_momentum(step: Tensor | int, max_steps: int, base: float = 0.996, final: float = 1.0) -> Tensor:
    """BYOL's schedule: `final - (final - base) * (cos(pi * step / max_steps) + 1) / 2`, from `base` at step 0
    to `final` at `max_steps` (held there after). `step` may be a tensor (a step-counter buffer: no sync)."""
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be an int >= 1, got {max_steps!r}")
    for name, value in (("base", base), ("final", final)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} momentum must lie in [0, 1], got {value!r}")
    step = torch.as_tensor(step, dtype=torch.float32)
    progress = (step / max_steps).clamp(0.0, 1.0)
    return final - (final - base) * (torch.cos(math.pi * progress) + 1) / 2


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen deep copy of `module` (the target network): no gradients, the same train/eval mode."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def update_momentum(online: nn.Module, target: nn.Module, momentum: Tensor | float) -> None:
    """target <- momentum * target + (1 - momentum) * online, parameters and floating buffers (one fused
    `_foreach` call each); integer buffers (BatchNorm's counter) are copied."""
    t_params = [p for p in target.parameters()]
    o_params = [p.detach() for p in online.parameters()]
    if len(t_params) != len(o_params):
        raise ValueError(f"online and target networks differ: {len(o_params)} and {len(t_params)} parameters")
    t_buffers, o_buffers = list(target.buffers()), list(online.buffers())
    if len(t_buffers) != len(o_buffers):
        raise ValueError(f"online and target networks differ: {len(o_buffers)} and {len(t_buffers)} buffers")
    m = torch.as_tensor(momentum, dtype=torch.float32)
    if t_params:
        torch._foreach_lerp_(t_params, o_params, (1 - m).to(t_params[0].device))
    for tb, ob in zip(t_buffers, o_buffers):
        if tb.is_floating_point():
            tb.lerp_(ob.detach(), (1 - m).to(tb.device, tb.dtype))
        else:
            tb.copy_(ob)
