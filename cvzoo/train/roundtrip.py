"""The save/load check: does a model's state_dict, loaded into a freshly built model, reproduce it?

A checkpoint restores only what `state_dict()` holds. State outside it (a non-persistent buffer changed at run
time, a parameter created lazily, an attribute set after construction) is silently lost on resume or export.
`check_state_round_trip` catches that before training, on one batch, in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn


class StateRoundTripError(RuntimeError):
    """The model's state_dict, loaded into `rebuild()`, does not reproduce the model's outputs."""


def check_state_round_trip(model: nn.Module, rebuild: Callable[[], nn.Module], inputs: Any, targets: Any, *,
                           rtol: float = 1e-4, atol: float = 1e-6) -> None:
    """Loads `model.state_dict()` into `rebuild()` and compares every term of `loss(inputs, targets)` of both,
    in eval mode without gradients; raises `StateRoundTripError` naming the first term that differs.

    The fresh model is moved to the device and memory format of `model`'s first parameter. `model`'s
    train/eval mode is restored afterwards. The two compared losses start from the same random state;
    `rebuild` and a first uncompared call of `model.loss` advance the generators: callers that care save
    and restore them."""
    fresh = rebuild()
    if not isinstance(fresh, nn.Module):
        raise ValueError(f"rebuild() must return an nn.Module, got {type(fresh).__name__}")
    try:
        fresh.load_state_dict(model.state_dict())
    except RuntimeError as err:
        raise StateRoundTripError(f"the model's state_dict does not load into rebuild()'s model: {err}") from err
    first = next(model.parameters(), None)
    if first is not None:
        fresh.to(first.device)
        if first.ndim == 4 and first.is_contiguous(memory_format=torch.channels_last) and not first.is_contiguous():
            fresh.to(memory_format=torch.channels_last)
    was_training = model.training
    model.eval()
    fresh.eval()
    try:
        # The compared calls start from the same random state, so random sampling inside `loss` (the RoI
        # samplers of two-stage detectors draw in eval mode too) compares equal. A first, uncompared call
        # lets state that `loss` creates lazily exist in `model` only, drawn from the live generators: the
        # fresh model then creates its own from another random state, and the check still catches it.
        devices = [first.device.index or 0] if first is not None and first.device.type == "cuda" else []
        with torch.no_grad():
            model.loss(inputs, targets)
            with torch.random.fork_rng(devices=devices):
                ours = model.loss(inputs, targets)
            with torch.random.fork_rng(devices=devices):
                theirs = fresh.loss(inputs, targets)
    finally:
        model.train(was_training)
    if not isinstance(ours, Mapping):
        raise ValueError(f"model.loss must return a dict of scalar tensors, got {type(ours).__name__}")
    for key, value in ours.items():
        other = theirs.get(key)
        same = (isinstance(other, Tensor) and value.shape == other.shape
                and bool(torch.allclose(value.float(), other.float(), rtol=rtol, atol=atol, equal_nan=True)))
        if not same:
            got = "missing" if other is None else f"{other.float().tolist()}"
            raise StateRoundTripError(
                f"save/load check failed: loss term {key!r} is {value.float().tolist()} for the model but {got} "
                f"for rebuild() loaded with its state_dict, on the same batch in eval mode. Some state is not in "
                f"state_dict (a non-persistent buffer changed at run time, a parameter created lazily, an "
                f"attribute set after construction), so a checkpoint would not restore this model")
