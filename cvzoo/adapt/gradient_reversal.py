"""Gradient reversal (Ganin & Lempitsky 2015): identity forward, gradient times -coefficient backward.

The layer between a feature extractor and an adversary (a domain or bias classifier) makes the adversary
learn to predict the nuisance while the features learn to hide it, in one ordinary backward pass.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class _ReverseGradient(torch.autograd.Function):
    """x -> x; grad -> -coefficient * grad (no gradient for the coefficient). Dynamo traces it whole."""

    @staticmethod
    def forward(ctx, x: Tensor, coefficient: Tensor) -> Tensor:
        ctx.save_for_backward(coefficient)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (coefficient,) = ctx.saved_tensors
        return -coefficient.to(grad.dtype) * grad, None


def reverse_gradient(x: Tensor, coefficient: Tensor | float = 1.0) -> Tensor:
    """Identity on `x` whose backward multiplies the incoming gradient by `-coefficient`."""
    if not isinstance(coefficient, Tensor):
        coefficient = torch.tensor(float(coefficient), device=x.device)
    return _ReverseGradient.apply(x, coefficient.detach())


def dann_coefficient(progress: Tensor | float, gamma: float = 10.0) -> Tensor:
    """DANN's schedule: 2 / (1 + exp(-gamma * p)) - 1 for training progress p in [0, 1] (0 at the start, ~1 at
    the end), which keeps the adversary's noisy early gradients away from the features."""
    p = torch.as_tensor(progress, dtype=torch.float32).clamp(0.0, 1.0)
    return 2.0 / (1.0 + torch.exp(-gamma * p)) - 1.0


class GradientReversal(nn.Module):
    """(...) -> (...) unchanged; backward multiplies gradients by -coefficient.

    `coefficient` is a fixed weight, or with `schedule_steps` set it follows `dann_coefficient(step /
    schedule_steps, gamma) * coefficient`, where `step` is a buffer counting the training-mode forward calls
    (saved in checkpoints, so a resumed run continues the schedule). All tensor arithmetic: compiles with
    `fullgraph=True`.
    """

    def __init__(self, coefficient: float = 1.0, *, schedule_steps: int | None = None, gamma: float = 10.0) -> None:
        super().__init__()
        if isinstance(coefficient, bool) or not isinstance(coefficient, (int, float)) or not math.isfinite(
                coefficient) or coefficient < 0:
            raise ValueError(f"coefficient must be a finite number >= 0, got {coefficient!r}")
        if schedule_steps is not None and (isinstance(schedule_steps, bool) or not isinstance(schedule_steps, int)
                                           or schedule_steps < 1):
            raise ValueError(f"schedule_steps must be None (a constant coefficient) or an int >= 1, got "
                             f"{schedule_steps!r}")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0:
            raise ValueError(f"gamma must be a positive number, got {gamma!r}")
        self.coefficient = float(coefficient)
        self.schedule_steps = schedule_steps
        self.gamma = float(gamma)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def current_coefficient(self) -> Tensor:
        """The coefficient the next forward call applies (a 0-d float32 tensor)."""
        if self.schedule_steps is None:
            return torch.full((), self.coefficient, device=self.step.device)
        return self.coefficient * dann_coefficient(self.step.float() / self.schedule_steps, self.gamma)

    def forward(self, x: Tensor) -> Tensor:
        coefficient = self.current_coefficient()
        if self.training:
            self.step.add_(1)
        return reverse_gradient(x, coefficient)

    def extra_repr(self) -> str:
        schedule = f", schedule_steps={self.schedule_steps}, gamma={self.gamma}" if self.schedule_steps else ""
        return f"coefficient={self.coefficient}{schedule}"
