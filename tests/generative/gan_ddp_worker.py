"""Run by test_gan_ddp.py under `torchrun --nproc_per_node=2`: a class-conditional GAN trained through the
trainer's phases under DDP on CPU/Gloo (the discriminator runs twice a step, on real and on fake images).

python -m torch.distributed.run --nproc_per_node=2 gan_ddp_worker.py RESULT_PATH

Rank 0 writes the final parameters of both ranks' models to RESULT_PATH.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from gan_ddp_toys import STEPS, gan_loader, make_gan

from cvzoo.train import Trainer


def main() -> None:
    result_path = sys.argv[1]
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    model = make_gan()
    trainer = Trainer(model, strategy="auto", max_steps=STEPS, schedule="constant", progress=False, log_every=1,
                      seed=0, lr=1e-2)
    trainer.fit(gan_loader())
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    gathered = [None, None]
    dist.all_gather_object(gathered, params)
    if dist.get_rank() == 0:
        torch.save({"ranks": gathered, "history": trainer.history}, result_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
