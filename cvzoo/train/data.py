"""Data order the trainer can reproduce and resume: a seeded, sharded, skippable sampler and loader plumbing.

The trainer replaces the sampler of a map-style `DataLoader` built with `shuffle=True/False` (a `RandomSampler`
without replacement, a `SequentialSampler` or a `DistributedSampler`) by a `ResumableSampler`: the order of
epoch e is a permutation seeded by (seed, e), sharded over ranks like `DistributedSampler`, and a resumed run
starts it at the first batch not yet consumed without loading the skipped ones. Any other iterable (an
`IterableDataset`, a custom sampler or batch sampler, a list of batches) is used as given: `set_epoch(e)` is
called on its sampler when it has one, and on resume the consumed batches are read and dropped, so the order
is reproduced only if that iterable is itself deterministic.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
)
from torch.utils.data import Sampler as TorchSampler


class ResumableSampler(TorchSampler[int]):
    """Indices of one epoch for one rank: the order of `DistributedSampler(shuffle, seed, drop_last)` with a start.

    With `shuffle` the permutation is `torch.randperm(num_samples)` from a generator seeded with `seed + epoch`,
    padded by repeating its head (or truncated with `drop_last`) to a multiple of `num_replicas`, and rank r
    takes every num_replicas-th index from r. `set_start(i)` skips the first i indices of this rank (a resumed
    epoch); `set_epoch(e)` picks the epoch and resets the start to 0.
    """

    def __init__(self, num_samples: int, *, shuffle: bool = True, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 drop_last: bool = False) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must lie in [0, num_replicas), got rank={rank}, num_replicas={num_replicas}")
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = drop_last
        if drop_last and num_samples % num_replicas:
            self.per_rank = math.ceil((num_samples - num_replicas) / num_replicas)
        else:
            self.per_rank = math.ceil(num_samples / num_replicas)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.start = 0

    def set_start(self, start: int) -> None:
        if start < 0:
            raise ValueError(f"start must be non-negative, got {start}")
        self.start = start

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            indices = list(range(self.num_samples))
        total = self.per_rank * self.num_replicas
        if total > len(indices):  # pad by repeating the head, as DistributedSampler does
            pad = total - len(indices)
            indices += (indices * math.ceil(pad / len(indices)))[:pad]
        indices = indices[:total][self.rank:total:self.num_replicas]
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start)


def _loader_kwargs(loader: DataLoader) -> dict[str, Any]:
    """The constructor arguments of `loader` other than the data order (those this torch's DataLoader accepts)."""
    names = ("num_workers", "collate_fn", "pin_memory", "drop_last", "timeout", "worker_init_fn",
             "multiprocessing_context", "generator", "persistent_workers", "pin_memory_device", "in_order")
    accepted = inspect.signature(DataLoader.__init__).parameters
    kwargs = {n: getattr(loader, n) for n in names if n in accepted and hasattr(loader, n)}
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    return kwargs


def make_resumable(loader: Iterable, *, seed: int, num_replicas: int = 1, rank: int = 0) -> Iterable:
    """`loader` with its sampler replaced by a `ResumableSampler`, when it is a DataLoader whose order the trainer
    can take over (see the module docstring); otherwise `loader` unchanged."""
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return loader
    sampler = loader.sampler
    if type(loader.batch_sampler) is not BatchSampler or loader.batch_size is None:
        return loader  # a custom batch sampler: its order is its own
    if isinstance(sampler, ResumableSampler):
        return loader
    if type(sampler) is RandomSampler and not sampler.replacement and sampler._num_samples is None:
        shuffle, drop_last = True, False
    elif type(sampler) is SequentialSampler:
        shuffle, drop_last = False, False
    elif type(sampler) is DistributedSampler:
        shuffle, drop_last = sampler.shuffle, sampler.drop_last
        if sampler.num_replicas != num_replicas or sampler.rank != rank:
            raise ValueError(f"train_loader has a DistributedSampler for rank {sampler.rank} of "
                             f"{sampler.num_replicas}, but this process is rank {rank} of {num_replicas}")
    else:
        return loader
    new_sampler = ResumableSampler(len(loader.dataset), shuffle=shuffle, seed=seed, num_replicas=num_replicas,
                                   rank=rank, drop_last=drop_last)
    kwargs = _loader_kwargs(loader)
    kwargs["generator"] = torch.Generator()  # worker seeds from (seed, epoch), never from the global RNG
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=new_sampler, **kwargs)


def is_sharded(loader: Iterable) -> bool:
    """Whether each rank reads its own part of `loader` (a ResumableSampler or DistributedSampler over ranks)."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, ResumableSampler):
        return sampler.num_replicas > 1
    return isinstance(sampler, DistributedSampler) or isinstance(getattr(loader, "batch_sampler", None),
                                                                 DistributedSampler)


def resumable_sampler(loader: Iterable) -> ResumableSampler | None:
    sampler = getattr(loader, "sampler", None)
    return sampler if isinstance(sampler, ResumableSampler) else None


def start_epoch(loader: Iterable, epoch: int, seed: int, skip_batches: int = 0) -> Iterator:
    """An iterator over epoch `epoch` of `loader`, starting after `skip_batches` batches."""
    sampler = resumable_sampler(loader)
    if sampler is not None:
        sampler.set_epoch(epoch)
        sampler.set_start(skip_batches * loader.batch_size)
        loader.generator.manual_seed(seed * 1_000_003 + epoch)
        return iter(loader)
    for obj in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
    it = iter(loader)
    for _ in range(skip_batches):  # cannot seek: read and drop the consumed batches
        if next(it, _END) is _END:
            break
    return it


_END = object()


def batches_per_epoch(loader: Iterable) -> int | None:
    """len(loader) for a full epoch (before any resume start), or None when the loader has no length."""
    sampler = resumable_sampler(loader)
    if sampler is not None:
        n, b = sampler.per_rank, loader.batch_size
        return n // b if loader.drop_last else math.ceil(n / b)
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def to_device(obj: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Moves tensors, recursively through lists, tuples (named too), dicts and objects with a `.to(device)`."""
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device, non_blocking) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(to_device(v, device, non_blocking) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device, non_blocking) for v in obj)
    to = getattr(obj, "to", None)
    if callable(to) and not isinstance(obj, type):
        try:
            return to(device)
        except TypeError:
            return obj
    return obj


def batch_size_of(inputs: Any) -> int:
    """Number of samples in `inputs`: the leading size of the first tensor, or the length of a list of images."""
    if isinstance(inputs, Tensor):
        return inputs.shape[0] if inputs.ndim else 1
    if isinstance(inputs, (list, tuple)):
        return len(inputs)
    if isinstance(inputs, Mapping):
        for v in inputs.values():
            return batch_size_of(v)
    return 1
