"""Run by test_contrastive_ddp.py under `torchrun --nproc_per_node=2` (CPU, Gloo): each rank holds its half of
a combined batch and computes the contrastive losses with the batch gathered across ranks.

python -m torch.distributed.run --nproc_per_node=2 contrastive_ddp_worker.py RESULT_PATH

Rank 0 writes every rank's losses, gradients and gathered tensors to RESULT_PATH.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

BATCH = 3  # per rank
DIM = 5
TEMPERATURE = 0.3
QUEUE_SIZE = 7


def combined_batch(world: int) -> dict[str, torch.Tensor]:
    """The combined batch every rank draws identically, float64 (world * BATCH rows)."""
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(world * BATCH, DIM, generator=g, dtype=torch.float64)
            for name in ("z1", "z2", "query", "keys", "moco_keys")}


def main() -> None:
    from cvzoo.backbones import ResNet
    from cvzoo.ssl.contrastive import MoCo, info_nce_loss, nt_xent_loss
    from cvzoo.ssl.gather import gather_with_grad, rank_and_world

    result_path = sys.argv[1]
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = rank_and_world()
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    local = {name: value[rows].clone().requires_grad_(True) for name, value in combined_batch(world).items()}
    out: dict[str, object] = {"rank": rank, "world": world}

    loss = nt_xent_loss(local["z1"], local["z2"], TEMPERATURE)
    loss.backward()
    out["nt_xent"] = loss.detach()
    out["nt_xent_grads"] = (local["z1"].grad.clone(), local["z2"].grad.clone())
    out["nt_xent_local"] = nt_xent_loss(local["z1"], local["z2"], TEMPERATURE, gather=False).detach()

    loss = info_nce_loss(local["query"], local["keys"], None, TEMPERATURE)
    loss.backward()
    out["info_nce"] = loss.detach()
    out["info_nce_grads"] = (local["query"].grad.clone(), local["keys"].grad.clone())
    out["info_nce_local"] = info_nce_loss(local["query"], local["keys"], None, TEMPERATURE, gather=False).detach()

    out["gathered"] = gather_with_grad(local["z1"].detach())

    torch.manual_seed(0)  # the same model on every rank, as DDP's initial broadcast makes it
    moco = MoCo(ResNet(layers=(1,), widths=(4,), stem_width=4, out_indices=(0,)), version=2, projection_dim=DIM,
                hidden_dim=4, queue_size=QUEUE_SIZE)
    out["queue_before"] = moco.queue.clone()
    moco.enqueue(local["moco_keys"].detach().float())
    out["queue_after"], out["queue_ptr"] = moco.queue.clone(), int(moco.queue_ptr)

    gathered = [None] * world
    dist.all_gather_object(gathered, out)
    if rank == 0:
        torch.save(gathered, result_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
