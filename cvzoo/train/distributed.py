"""Multi-process training under torchrun: process group, DDP / FSDP2 wrapping, collectives, full state dicts.

Launch with `torchrun --nproc_per_node=N script.py`; torchrun sets `RANK`, `WORLD_SIZE`, `LOCAL_RANK` (and
`MASTER_ADDR` / `MASTER_PORT`), which `DistInfo.from_env` reads. The process group uses NCCL on CUDA and Gloo
on CPU. Every function here is a no-op or the identity in a single process, so the trainer calls them
unconditionally.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("auto", "single", "ddp", "fsdp")
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: global rank, number of processes, rank on this node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, shows progress and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls) -> DistInfo:
        """Reads torchrun's variables; a plain `python script.py` is rank 0 of 1."""
        if not launched_by_torchrun():
            return cls()
        return cls(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))


def launched_by_torchrun() -> bool:
    return all(v in os.environ for v in _TORCHRUN_VARS)


def resolve_strategy(strategy: str) -> str:
    """"auto" -> "ddp" under torchrun with more than one process, else "single". Checks the launch."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    info = DistInfo.from_env()
    if strategy == "auto":
        return "ddp" if info.distributed else "single"
    if strategy in ("ddp", "fsdp") and not launched_by_torchrun():
        raise ValueError(f"strategy={strategy!r} needs a torchrun launch (RANK, WORLD_SIZE, LOCAL_RANK unset); "
                         f"run `torchrun --nproc_per_node=N script.py` or use strategy='single'")
    if strategy == "single" and info.distributed:
        raise ValueError(f"strategy='single' under torchrun with WORLD_SIZE={info.world_size}: every process "
                         f"would train its own copy; use 'ddp' or 'fsdp'")
    return strategy


def resolve_device(device: str | torch.device, local_rank: int = 0) -> torch.device:
    """"auto" -> cuda:LOCAL_RANK when CUDA is available, else cpu; anything else goes through torch.device."""
    if isinstance(device, str) and device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be 'auto' or a torch device, got {device!r}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available; use device='auto' or 'cpu'")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return dev


def init_distributed(device: torch.device) -> tuple[DistInfo, bool]:
    """Joins the torchrun process group (NCCL on CUDA, Gloo otherwise) unless already joined.

    Returns this process's `DistInfo` and whether this call created the group (then `destroy_distributed`
    should end it)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), DistInfo.from_env().local_rank), False
    info = DistInfo.from_env()
    if not launched_by_torchrun():
        return info, False
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=info.rank, world_size=info.world_size, device_id=device)
    else:
        dist.init_process_group("gloo", rank=info.rank, world_size=info.world_size)
    return info, True


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def any_across_ranks(flag: torch.Tensor) -> torch.Tensor:
    """Logical OR of a boolean/0-1 tensor over all ranks (a MAX all-reduce), as an int tensor."""
    flag = flag.to(torch.int32)
    if is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` of rank `src` on every rank (picklable objects only)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap_ddp(module: nn.Module, device: torch.device, **kwargs: Any) -> nn.parallel.DistributedDataParallel:
    """`DistributedDataParallel(module)` on this process's device (device_ids only for CUDA)."""
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, **kwargs)


def fsdp_blocks(model: nn.Module) -> Iterator[nn.Module]:
    """The blocks FSDP2 shards separately: the model's children that hold parameters, with ModuleList /
    Sequential children expanded into their items (a backbone's stages, a transformer's blocks)."""
    for child in model.children():
        items = list(child.children()) if isinstance(child, (nn.ModuleList, nn.Sequential)) else [child]
        for item in items:
            if any(True for _ in item.parameters()):
                yield item


def shard_fsdp(model: nn.Module, **kwargs: Any) -> nn.Module:
    """FSDP2: `fully_shard` on each block of `model` (see `fsdp_blocks`), then on `model` itself, the root, which
    gathers whatever parameters no block owns before its forward. Sharded in place; returns `model`.

    `model.loss` must reach those root parameters through `model.forward` (the root's gather runs in its
    forward hook), which the task models do."""
    from torch.distributed.fsdp import fully_shard

    for block in fsdp_blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def set_gradient_sync(module: nn.Module, strategy: str, enabled: bool):
    """A context for one micro-batch: DDP's `no_sync()` when `enabled` is False; FSDP2's
    `set_requires_gradient_sync(enabled)`; nothing for a single process."""
    if strategy == "ddp" and not enabled:
        return module.no_sync()
    if strategy == "fsdp":
        module.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def full_model_state(model: nn.Module, strategy: str) -> dict[str, Any]:
    """The unsharded state dict of `model` (for FSDP: on CPU, complete on rank 0 only; collective)."""
    if strategy != "fsdp":
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, strategy: str) -> dict[str, Any]:
    """`optimizer.state_dict()`, or for FSDP the unsharded one keyed by parameter names (collective)."""
    if strategy != "fsdp":
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, strategy: str,
                    model_state: Mapping[str, Any], optimizer_state: Mapping[str, Any] | None) -> None:
    """Inverse of `full_model_state` / `full_optimizer_state`; every rank passes the full states it loaded."""
    if strategy != "fsdp":
        model.load_state_dict(model_state)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, dict(model_state), options=options)
    if optimizer_state is None:
        return
    if not optimizer_state.get("state"):  # a stateless optimizer (plain SGD): torch's loader needs a tensor
        for group, saved in zip(optimizer.param_groups, optimizer_state.get("param_groups", [])):
            group.update({k: v for k, v in saved.items() if k != "params"})
        return
    set_optimizer_state_dict(model, optimizer, dict(optimizer_state), options=options)
