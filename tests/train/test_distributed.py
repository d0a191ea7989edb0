import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DistributedSampler
from train_toys import TinyNet, toy_data, toy_loader

from cvzoo.train.checkpoint import LAST, load_checkpoint
from cvzoo.train.data import ResumableSampler, batches_per_epoch, make_resumable, start_epoch
from cvzoo.train.distributed import DistInfo, fsdp_blocks, resolve_strategy

WORKER = Path(__file__).with_name("ddp_worker.py")


# ---- sampler -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,replicas,shuffle,drop_last", [(10, 1, True, False), (10, 3, True, False),
                                                          (10, 3, True, True), (7, 2, False, False),
                                                          (8, 4, True, True)])
def test_resumable_sampler_matches_distributed_sampler(n, replicas, shuffle, drop_last):
    data = list(range(n))
    for epoch in (0, 1, 5):
        for rank in range(replicas):
            ref = DistributedSampler(data, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=7,
                                     drop_last=drop_last)
            ref.set_epoch(epoch)
            ours = ResumableSampler(n, shuffle=shuffle, seed=7, num_replicas=replicas, rank=rank,
                                    drop_last=drop_last)
            ours.set_epoch(epoch)
            assert list(ours) == list(ref) and len(ours) == len(ref)
            ours.set_start(2)
            assert list(ours) == list(ref)[2:] and len(ours) == len(ref) - 2


def test_loader_takeover_shards_and_resumes_mid_epoch():
    loader = toy_loader(n=20, batch_size=3, shuffle=True)
    shards = [make_resumable(loader, seed=1, num_replicas=2, rank=r) for r in range(2)]
    assert [batches_per_epoch(s) for s in shards] == [4, 4]  # 10 samples a rank, the last batch short
    seen = [torch.cat([labels for _, labels in start_epoch(s, 0, seed=1)]) for s in shards]
    images = toy_data(20).tensors[1]
    expected = [images[list(ResumableSampler(20, seed=1, num_replicas=2, rank=r))] for r in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(seen, expected))
    full = list(start_epoch(shards[0], 3, seed=1))
    resumed = list(start_epoch(shards[0], 3, seed=1, skip_batches=2))
    assert len(resumed) == 2 and all(torch.equal(a[1], b[1]) for a, b in zip(resumed, full[2:]))
    plain = [(torch.zeros(1), torch.zeros(1))] * 3  # not a DataLoader: used as is, skipped by reading
    assert make_resumable(plain, seed=0) is plain and len(list(start_epoch(plain, 0, 0, skip_batches=1))) == 2


def test_loader_takeover_keeps_the_loader_settings():
    def collate(samples):
        images, labels = torch.utils.data.default_collate(samples)
        return images * 2, labels

    loader = torch.utils.data.DataLoader(toy_data(10), batch_size=4, shuffle=True, drop_last=True, num_workers=1,
                                         collate_fn=collate, prefetch_factor=3, timeout=30)
    new = make_resumable(loader, seed=0)
    assert isinstance(new.sampler, ResumableSampler) and new.sampler.shuffle
    assert (new.batch_size, new.drop_last, new.num_workers, new.collate_fn, new.prefetch_factor, new.timeout) == (
        4, True, 1, collate, 3, 30)
    assert batches_per_epoch(new) == 2
    batches = list(start_epoch(new, 0, seed=0))  # through a worker process
    order = list(ResumableSampler(10, seed=0))
    images = toy_data(10).tensors[0]
    assert len(batches) == 2 and torch.equal(batches[1][0], images[order[4:8]] * 2)
    sequential = make_resumable(toy_loader(n=10), seed=0)
    assert list(sequential.sampler) == list(range(10))


# ---- strategy and environment ------------------------------------------------------------------------


def test_strategy_resolution(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_strategy("auto") == "single" and DistInfo.from_env() == DistInfo(0, 1, 0)
    with pytest.raises(ValueError, match="strategy='fsdp' needs a torchrun launch"):
        resolve_strategy("fsdp")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_strategy("auto") == "ddp" and DistInfo.from_env() == DistInfo(1, 2, 1)
    assert not DistInfo.from_env().is_main
    with pytest.raises(ValueError, match="strategy='single' under torchrun with WORLD_SIZE=2"):
        resolve_strategy("single")


def test_fsdp_blocks_expand_sequential_children():
    model = torch.nn.Sequential()
    model.stem = torch.nn.Conv2d(3, 4, 1)
    model.stages = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 1))
    model.act = torch.nn.ReLU()
    assert list(fsdp_blocks(model)) == [model.stem, model.stages[0], model.stages[2]]


# ---- two Gloo processes ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def torchrun_result(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(WORKER), str(tmp / "result.pt"),
           str(tmp / "ckpt")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"torchrun timed out:\n{err.stdout}\n{err.stderr}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = torch.load(tmp / "result.pt", weights_only=True)
    result["ckpt"] = tmp / "ckpt"
    return result


def _reference(steps: int) -> dict[str, torch.Tensor]:
    """One process, plain autograd and torch's SGD on the combined batches: samples 0..15, 16..31, 0..15."""
    torch.manual_seed(0)
    model = TinyNet(norm="group")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    images, labels = toy_data(32).tensors
    for step in range(steps):
        rows = slice(0, 16) if step % 2 == 0 else slice(16, 32)
        optimizer.zero_grad()
        model.loss(images[rows], labels[rows])["loss"].backward()
        optimizer.step()
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("run,steps", [("ddp", 2), ("fsdp", 2), ("fsdp_resumed", 3)])
def test_two_processes_equal_one_process_on_the_combined_batch(torchrun_result, run, steps):
    expected = _reference(steps)
    got = torchrun_result[run]["model"]
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=f"{run}: {name}")
    assert [h["step"] for h in torchrun_result[run]["history"] if "train/loss" in h] == list(range(1, steps + 1))


def test_distributed_checkpoints_hold_every_ranks_rng(torchrun_result):
    for run in ("ddp", "fsdp"):
        ckpt = load_checkpoint(torchrun_result["ckpt"] / run / LAST)
        assert ckpt["step"] == 2 and len(ckpt["rng"]) == 2 and ckpt["config"]["world_size"] == 2
        expected = _reference(2)
        for name, value in expected.items():  # full (unsharded) weights, plain keys
            torch.testing.assert_close(ckpt["model"][name], value, rtol=0, atol=1e-6)
    assert torchrun_result["ddp"]["ranks_in_checkpoint"] == 2
