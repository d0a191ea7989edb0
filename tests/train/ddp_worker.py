"""Run by test_distributed.py under `torchrun --nproc_per_node=2`: DDP and FSDP2 training on CPU/Gloo.

python -m torch.distributed.run --nproc_per_node=2 ddp_worker.py RESULT_PATH CHECKPOINT_DIR

Each rank trains TinyNet (GroupNorm, SGD with lr 0.5 and momentum 0.9: checkpointed optimizer state) on a
`DataLoader(shuffle=False, batch_size=4)` that the trainer shards (rank r reads samples r, r + 2, ...),
with grad_accum=2: a step sees 2 ranks x 2 micro-batches x 4 = 16 samples, in order 0..15, then 16..31.
Rank 0 writes the parameters after each run to RESULT_PATH.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from train_toys import TinyNet, sgd, toy_loader

from cvzoo.train import Trainer


def _run(strategy: str, max_steps: int, out_dir: str | None = None, resume: str | None = None) -> dict:
    torch.manual_seed(0)  # the same initial weights on every rank (DDP would broadcast rank 0's anyway)
    model = TinyNet(norm="group")
    trainer = Trainer(model, strategy=strategy, max_steps=max_steps, grad_accum=2, optimizer=sgd(0.5, momentum=0.9),
                      schedule="constant", out_dir=out_dir, progress=False, log_every=1)
    trainer.fit(toy_loader(n=32, batch_size=4), resume=resume)
    state = trainer.state_dict()  # collective: the full weights, also under FSDP
    return {"model": state["model"], "history": trainer.history, "ranks_in_checkpoint": len(state["rng"])}


def main() -> None:
    result_path, ckpt_dir = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")  # ours, so the trainers reuse it and leave it open
    torch.set_num_threads(1)
    out = {"ddp": _run("auto", 2, out_dir=f"{ckpt_dir}/ddp"),
           "fsdp": _run("fsdp", 2, out_dir=f"{ckpt_dir}/fsdp")}
    out["fsdp_resumed"] = _run("fsdp", 3, resume=f"{ckpt_dir}/fsdp/last.pt")
    if dist.get_rank() == 0:
        torch.save(out, result_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
