"""NT-Xent and MoCo v3's InfoNCE under DDP (2 Gloo processes, each with half of a batch) against the same
losses on the combined batch in one process, and MoCo v2's queue filled with the gathered keys.

The convention checked (see `nt_xent_loss`): each rank's loss is the mean over its own anchors, compared with
the gathered global batch; the mean of the ranks' losses is the combined-batch loss, and each rank's gradient
w.r.t. its rows is `world` times the combined-batch gradient of those rows, so that DDP's averaging of the
parameter gradients over ranks gives the combined-batch gradient.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from contrastive_ddp_worker import BATCH, QUEUE_SIZE, TEMPERATURE, combined_batch

from cvzoo.ssl.contrastive import info_nce_loss, nt_xent_loss

WORKER = Path(__file__).with_name("contrastive_ddp_worker.py")
WORLD = 2


pytestmark = pytest.mark.usefixtures("one_thread")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    result = tmp_path_factory.mktemp("contrastive_ddp") / "result.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={WORLD}",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(WORKER), str(result)]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(WORKER.parent), os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"torchrun timed out:\n{err.stdout}\n{err.stderr}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = torch.load(result, weights_only=False)
    assert [r["rank"] for r in out] == list(range(WORLD)) and all(r["world"] == WORLD for r in out)
    return out


def _combined(loss_fn, names: tuple[str, str]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    data = combined_batch(WORLD)
    inputs = [data[n].clone().requires_grad_(True) for n in names]
    loss = loss_fn(*inputs)
    return loss.detach(), torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("kind", ["nt_xent", "info_nce"])
def test_ddp_loss_and_gradients_match_the_combined_batch(ranks, kind):
    if kind == "nt_xent":
        loss, grads = _combined(lambda a, b: nt_xent_loss(a, b, TEMPERATURE), ("z1", "z2"))
    else:
        loss, grads = _combined(lambda q, k: info_nce_loss(q, k, None, TEMPERATURE), ("query", "keys"))
    # (a) the ranks' losses (each the mean over its own anchors) average to the combined-batch loss
    torch.testing.assert_close(torch.stack([r[kind] for r in ranks]).mean(), loss, rtol=0, atol=1e-6)
    assert not torch.allclose(ranks[0][kind], ranks[1][kind])  # each rank has its own anchors
    # (b) a rank's gradient of its rows is WORLD x their combined-batch gradient: DDP's mean restores it
    for r in ranks:
        rows = slice(r["rank"] * BATCH, (r["rank"] + 1) * BATCH)
        for got, full in zip(r[f"{kind}_grads"], grads):
            torch.testing.assert_close(got / WORLD, full[rows], rtol=1e-9, atol=1e-12)


def test_ddp_gather_is_in_rank_order_and_local_loss_without_gather(ranks):
    data = combined_batch(WORLD)
    for r in ranks:
        torch.testing.assert_close(r["gathered"], data["z1"], rtol=0, atol=0)
        rows = slice(r["rank"] * BATCH, (r["rank"] + 1) * BATCH)
        local = nt_xent_loss(data["z1"][rows], data["z2"][rows], TEMPERATURE)  # gather=False: this rank alone
        torch.testing.assert_close(r["nt_xent_local"], local, rtol=0, atol=1e-12)
        local = info_nce_loss(data["query"][rows], data["keys"][rows], None, TEMPERATURE)
        torch.testing.assert_close(r["info_nce_local"], local, rtol=0, atol=1e-12)


def test_ddp_moco_queue_holds_the_gathered_keys(ranks):
    keys = combined_batch(WORLD)["moco_keys"].float()  # rank 0's keys, then rank 1's
    slots = list(ranks[0]["queue_before"])
    for i, key in enumerate(keys):  # the hand FIFO, wrapping: 6 keys into 7 slots from 0
        slots[i % QUEUE_SIZE] = key / key.norm()
    for r in ranks:
        torch.testing.assert_close(r["queue_after"], torch.stack(slots))  # identical on every rank
        assert r["queue_ptr"] == len(keys) % QUEUE_SIZE
