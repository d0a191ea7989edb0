"""A GAN trained through the trainer's phases under DDP (2 Gloo processes) equals two simulated ranks in one
process: each rank's batch shard and random stream, gradients averaged over ranks, one Adam per phase."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gan_ddp_toys import BATCH, STEPS, gan_data, make_gan

WORKER = Path(__file__).with_name("gan_ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def simulated_ranks(world: int = 2) -> dict[str, torch.Tensor]:
    """DDP by hand: rank r reads samples r, r + world, ... (the trainer's sharding of an unshuffled loader) and
    draws its latents from torch's generator seeded with seed + r (the trainer's seeding); the update uses the
    mean of the ranks' gradients, phase by phase."""
    model = make_gan()
    optimizers = model.configure_optimizers(1e-2, 0.05)
    images, labels = gan_data().tensors
    shards = [torch.arange(r, len(images), world) for r in range(world)]
    rng = []
    for r in range(world):
        torch.manual_seed(r)
        rng.append(torch.get_rng_state())
    for step in range(STEPS):
        for phase, optimizer in optimizers.items():
            grads = []
            for r in range(world):
                rows = shards[r][step * BATCH:(step + 1) * BATCH]
                model.zero_grad(set_to_none=True)
                torch.set_rng_state(rng[r])
                model.loss(images[rows], labels[rows], phase=phase)["loss"].backward()
                rng[r] = torch.get_rng_state()
                grads.append([p.grad.clone() if p.grad is not None else None for p in model.parameters()])
            for i, p in enumerate(model.parameters()):
                per_rank = [g[i] for g in grads]
                p.grad = None if per_rank[0] is None else torch.stack(per_rank).mean(0)
            optimizer.step()
            model.zero_grad(set_to_none=True)
    return {n: p.detach() for n, p in model.named_parameters()}


def test_gan_under_ddp_matches_simulated_ranks(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(WORKER), str(tmp_path / "result.pt")]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(WORKER.parent), os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"torchrun timed out:\n{err.stdout}\n{err.stderr}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = torch.load(tmp_path / "result.pt", weights_only=False)
    rank0, rank1 = result["ranks"]
    expected = simulated_ranks()
    start = {n: p.detach() for n, p in make_gan().named_parameters()}
    assert any(not torch.equal(start[n], rank0[n]) for n in start), "training did not move the weights"
    for name, value in expected.items():
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0)  # ranks stay in sync
        torch.testing.assert_close(rank0[name], value, rtol=1e-5, atol=1e-6, msg=name)
    logged = [r for r in result["history"] if "train/loss_discriminator" in r]
    assert len(logged) == STEPS
