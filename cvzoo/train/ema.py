"""Exponential moving average of a model's weights (timm's ModelEmaV2/V3, parameters averaged, buffers copied)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from cvzoo.train.checkpoint import strip_wrapper_prefixes, unwrap_model


class ModelEMA:
    """A frozen copy of `model` whose floating-point parameters follow ema = d * ema + (1 - d) * param.

    `update(model)` after each optimizer step averages the parameters with decay d and copies the buffers
    (BatchNorm running statistics are already averages; averaging them again lags). With `warmup=True` the
    decay of the n-th update (n = 1, 2, ...) is min(decay, (1 + n) / (10 + n)) (the num_updates rule of
    tf.train.ExponentialMovingAverage), so early weights, far from the optimum, are forgotten quickly.

    `module` is the averaged model, in eval mode and without gradients: evaluate it like any model.
    `state_dict()` / `load_state_dict()` hold the averaged weights and the update count.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True,
                 device: torch.device | str | None = None) -> None:
        if not isinstance(decay, (int, float)) or not 0.0 < decay < 1.0:
            raise ValueError(f"decay must lie in (0, 1), got {decay!r}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.updates = 0
        self.module = copy.deepcopy(unwrap_model(model)).eval()
        if device is not None:
            self.module.to(device)
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next `update` will use."""
        if not self.warmup:
            return self.decay
        n = self.updates + 1
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Moves the average towards `model` (plain, compiled or DDP-wrapped, same architecture)."""
        d = self.current_decay()
        model = unwrap_model(model)
        ema_params = dict(self.module.named_parameters())
        for name, p in model.named_parameters():
            e = ema_params[name]
            src = p.detach().to(device=e.device, dtype=e.dtype)
            if e.is_floating_point():
                e.lerp_(src, 1.0 - d)  # e + (1 - d) * (p - e) = d * e + (1 - d) * p
            else:
                e.copy_(src)
        ema_buffers = dict(self.module.named_buffers())
        for name, b in model.named_buffers():
            if name in ema_buffers:
                ema_buffers[name].copy_(b.detach())
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay,
                "warmup": self.warmup}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the averaged weights and update count (the decay settings stay those of the constructor)."""
        self.module.load_state_dict(strip_wrapper_prefixes(state["module"]))
        self.updates = int(state["updates"])
