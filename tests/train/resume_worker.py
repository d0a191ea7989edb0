"""A training run for the resume tests, in its own process so it can be killed.

python resume_worker.py OUT_DIR RESULT_PATH MAX_STEPS SLEEP_PER_BATCH [auto]

Trains TinyNet with dropout, random augmentation in batch_transform (global torch RNG), shuffled data,
grad_accum=2 over 5 batches an epoch (steps of 2, 2 and 1 batches), AdamW + warmup/cosine, clipping and EMA,
checkpointing every step; writes the history, the weights and the EMA weights to RESULT_PATH at the end.
"""

from __future__ import annotations

import sys
import time

import torch
from torch.utils.data import DataLoader
from train_toys import TinyNet, toy_data

from cvzoo.train import Trainer


def main() -> None:
    out_dir, result, max_steps, sleep = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    resume = "auto" if len(sys.argv) > 5 else None
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TinyNet(dropout=0.2)

    def transform(images, labels):
        time.sleep(sleep)
        return images + 0.1 * torch.randn_like(images), labels

    trainer = Trainer(model, max_steps=max_steps, grad_accum=2, lr=1e-2, warmup_steps=2, clip_grad_norm=1.0,
                      ema_decay=0.9, out_dir=out_dir, checkpoint_every=1, log_every=1, progress=False, seed=3,
                      batch_transform=transform)
    trainer.fit(DataLoader(toy_data(20), batch_size=4, shuffle=True), resume=resume)
    torch.save({"history": [{k: v for k, v in h.items() if k != "samples_per_sec"} for h in trainer.history],
                "model": model.state_dict(), "ema": trainer.ema.module.state_dict(), "step": trainer.step,
                "interrupted": trainer.interrupted}, result)


if __name__ == "__main__":
    main()
