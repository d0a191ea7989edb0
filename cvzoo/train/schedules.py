"""Learning-rate schedules: pure `step -> multiplier` functions and the LambdaLR factory the trainer uses.

Each function maps an optimizer-step index (0 = the first step) to a multiplier of the base learning rate.
`build_scheduler` wraps one in `torch.optim.lr_scheduler.LambdaLR`, which the trainer steps once per optimizer
step, so optimizer step `t` runs at `lr * f(t)`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("cosine", "onecycle", "step", "constant")


def _check_steps(total_steps: int, warmup_steps: int) -> None:
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be a non-negative int, got {warmup_steps!r}")


def linear_warmup(step: int, warmup_steps: int) -> float:
    """Multiplier (step + 1) / warmup_steps during the first `warmup_steps` steps, 1 afterwards.

    The first step already gets a small non-zero rate (a step at lr 0 would be wasted)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 1.0


def warmup_cosine(step: int, *, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0) -> float:
    """Linear warmup, then half a cosine from 1 to `min_ratio` over the remaining steps.

    Without warmup this is `CosineAnnealingLR(T_max=total_steps, eta_min=min_ratio * lr)`:
    min_ratio + (1 - min_ratio) * (1 + cos(pi * step / total_steps)) / 2. Steps past the end stay at min_ratio.
    """
    if step < warmup_steps:
        return linear_warmup(step, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def one_cycle(step: int, *, total_steps: int, pct_start: float = 0.3, div_factor: float = 25.0,
              final_div_factor: float = 1e4, anneal: str = "cos") -> float:
    """The two-phase one-cycle policy of `OneCycleLR` (lr only, momentum is not cycled), as a multiplier of max lr.

    Rises from 1/div_factor to 1 over the first pct_start * total_steps steps, then falls to
    1/(div_factor * final_div_factor) at step total_steps - 1, annealing with a cosine or linearly.
    """
    if anneal not in ("cos", "linear"):
        raise ValueError(f"anneal must be 'cos' or 'linear', got {anneal!r}")
    step = min(step, total_steps - 1)  # hold the final value instead of raising like OneCycleLR
    initial, final = 1.0 / div_factor, 1.0 / (div_factor * final_div_factor)
    phases = ((float(pct_start * total_steps) - 1.0, initial, 1.0), (float(total_steps - 1), 1.0, final))
    start_step = 0.0
    for i, (end_step, start, end) in enumerate(phases):
        if step <= end_step or i == len(phases) - 1:
            pct = (step - start_step) / (end_step - start_step)
            if anneal == "cos":
                return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1.0)
            return (end - start) * pct + start
        start_step = end_step
    raise AssertionError("unreachable")


def step_decay(step: int, *, step_size: int, gamma: float = 0.1, warmup_steps: int = 0) -> float:
    """Linear warmup, then `gamma ** ((step - warmup_steps) // step_size)` (`StepLR` when there is no warmup)."""
    if step < warmup_steps:
        return linear_warmup(step, warmup_steps)
    return gamma ** ((step - warmup_steps) // step_size)


def constant(step: int, *, warmup_steps: int = 0) -> float:
    """Linear warmup, then 1."""
    return linear_warmup(step, warmup_steps)


def schedule_function(name: str, *, total_steps: int | None, warmup_steps: int = 0) -> Callable[[int], float]:
    """The `step -> multiplier` function of a named schedule, with the trainer's defaults.

    - "cosine": `warmup_cosine` down to 0 at `total_steps`;
    - "onecycle": `one_cycle` whose rising phase lasts `warmup_steps` steps if given, else 30% of the steps;
    - "step": `step_decay` by 0.1 at one and two thirds of the steps after warmup (like ImageNet's 30/60/90);
    - "constant": `constant` (the only one that does not need `total_steps`).
    """
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES} or a callable, got {name!r}")
    if name == "constant":
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative int, got {warmup_steps!r}")
        return functools.partial(constant, warmup_steps=warmup_steps)
    if total_steps is None:
        raise ValueError(f"schedule={name!r} needs the total number of steps: pass max_steps, or max_epochs "
                         f"with a train_loader that has a len()")
    _check_steps(total_steps, warmup_steps)
    if name == "cosine":
        return functools.partial(warmup_cosine, total_steps=total_steps, warmup_steps=warmup_steps)
    if name == "onecycle":
        pct_start = warmup_steps / total_steps if warmup_steps else 0.3
        if not 0.0 < pct_start < 1.0:
            raise ValueError(f"schedule='onecycle' needs warmup_steps < total_steps, got warmup_steps={warmup_steps} "
                             f"and total_steps={total_steps}")
        return functools.partial(one_cycle, total_steps=total_steps, pct_start=pct_start)
    step_size = max(1, math.ceil((total_steps - warmup_steps) / 3))
    return functools.partial(step_decay, step_size=step_size, warmup_steps=warmup_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str | Callable[[int], float], *,
                    total_steps: int | None, warmup_steps: int = 0) -> LambdaLR:
    """A `LambdaLR` for a named schedule (see `schedule_function`) or a user `step -> multiplier` callable."""
    fn = schedule if callable(schedule) else schedule_function(schedule, total_steps=total_steps,
                                                                warmup_steps=warmup_steps)
    return LambdaLR(optimizer, fn)
