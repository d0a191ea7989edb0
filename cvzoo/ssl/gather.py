"""Gathering a batch across data-parallel ranks with gradients, for losses whose negatives span the global batch
(SimCLR, MoCo v3, CLIP). Identity in a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when torch.distributed is unavailable or not
    initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: Tensor) -> Tensor:
    """(B, ...) on each of W ranks -> (W * B, ...), the ranks' tensors concatenated in rank order (this rank's
    rows at `rank * B`). Every rank must pass the same shape.

    Gradients flow back to each rank's own slice: the backward of `torch.distributed.nn.functional.all_gather`
    sums, over ranks, the gradient that each rank's loss sends to that slice, so a rank's `x.grad` is
    d(sum of all ranks' losses)/dx. Identity (no copy) without an initialised process group of world size > 1.
    """
    _, world = rank_and_world()
    if world == 1:
        return x
    from torch.distributed.nn.functional import all_gather  # autograd-aware, unlike dist.all_gather

    return torch.cat(all_gather(x), dim=0)  # (W * B, ...)
