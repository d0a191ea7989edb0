"""Counting what a piece of code dispatches: ATen operations and host-device synchronisations.

Works on any device (CPU included) and predicts GPU launch overhead: every dispatched op is at least
one kernel launch on CUDA, and every synchronisation stalls the host until the device catches up.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# ops whose result the host must read (or whose output size depends on data) before it can go on
SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
            aten.is_nonzero.default, aten.equal.default, aten.unique_consecutive.default,
            aten._unique2.default, aten.repeat_interleave.Tensor}


class OpCounter(TorchDispatchMode):
    """`with OpCounter() as c: ...` -> c.total dispatched ATen ops, c.syncs synchronising ones, c.ops by op."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func] += 1
        bool_index = func in (aten.index.Tensor, aten.index_put_.default) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []))
        if func in SYNC_OPS or bool_index:  # a boolean mask's output size is only known on the host
            self.syncs += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def count_ops(fn: Callable[[], object]) -> tuple[int, int]:
    """(dispatched ATen ops, synchronising ops) of one call of `fn`, backward passes included."""
    with OpCounter() as counter:
        fn()
    return counter.total, counter.syncs


def median_seconds(fn: Callable[[], object], device: str = "cpu", repeats: int = 5, warmup: int = 2) -> float:
    """Median wall time of `fn()` over `repeats` calls after `warmup` untimed ones; on CUDA each call is
    bracketed by synchronisations, so the time is the device's, not the launch's."""
    return paired_median_seconds([fn], device, repeats, warmup)[0]


def paired_median_seconds(fns: Sequence[Callable[[], object]], device: str = "cpu", repeats: int = 5,
                          warmup: int = 2) -> list[float]:
    """Median wall time of each of `fns`, called in turn (a, b, a, b, ...): `warmup` untimed rounds, then
    `repeats` timed ones. For side-by-side comparisons: each function runs in the same process state as
    the others. Timed one after the other instead, the second can run in a warmer (or colder) state the
    first left behind: on CPU, whether a 100 MB allocation faults in fresh pages or reuses freed ones
    changes a detection loss by 2x, and depends on what ran just before."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, own in zip(fns, times):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            own.append(time.perf_counter() - t)
    return [statistics.median(own) for own in times]
