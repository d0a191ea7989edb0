"""Weight initialisation helpers."""

from __future__ import annotations

import math

from torch import nn


def prior_probability_bias(prior_prob: float) -> float:
    """Bias that makes a sigmoid output `prior_prob` at init (RetinaNet's focal-loss init): -log((1-p)/p)."""
    if not 0.0 < prior_prob < 1.0:
        raise ValueError(f"prior_prob must lie in (0, 1), got {prior_prob}")
    return -math.log((1.0 - prior_prob) / prior_prob)


def init_conv_normal_(module: nn.Module, std: float = 0.01, bias: float = 0.0) -> None:
    """Normal(0, std) weights and constant bias for every Conv2d under `module` (detection-head convention)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.constant_(m.bias, bias)


def init_conv_kaiming_uniform_(module: nn.Module) -> None:
    """kaiming_uniform_(a=1) weights and zero bias for every Conv2d under `module` (torchvision's FPN init)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_uniform_(m.weight, a=1)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
