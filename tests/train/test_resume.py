"""Interrupted runs resume bit-identically (CPU): after SIGKILL, after SIGTERM, from previous.pt."""

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_toys import TinyNet, toy_loader

from cvzoo.train.checkpoint import LAST, PREVIOUS, CheckpointError, load_checkpoint
from cvzoo.train.trainer import Trainer

WORKER = Path(__file__).with_name("resume_worker.py")
MAX_STEPS = 9  # 3 epochs of 3 steps


def _start(out_dir: Path, result: Path, sleep: float, resume: bool = False) -> subprocess.Popen:
    args = [sys.executable, str(WORKER), str(out_dir), str(result), str(MAX_STEPS), str(sleep)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args + (["auto"] if resume else []), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> None:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"worker timed out:\n{out}")
    assert proc.returncode == 0, out


def _wait_for_checkpoint(out_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 60) -> int:
    """Polls out_dir/last.pt until it holds a step >= `step`; returns that step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"worker ended early:\n{proc.communicate()[0]}"
        try:
            got = load_checkpoint(out_dir / LAST)["step"]
            if got >= step:
                return got
        except CheckpointError:  # not written yet, or between the renames of a rotation
            pass
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no checkpoint at step {step} within {timeout} s")


def _assert_same_run(result: dict, reference: dict) -> None:
    assert result["step"] == reference["step"] == MAX_STEPS
    assert len(result["history"]) == len(reference["history"])
    for got, want in zip(result["history"], reference["history"]):
        assert got == want  # losses, lrs, grad norms: exactly equal floats
    for key in ("model", "ema"):
        for name, value in reference[key].items():
            assert torch.equal(result[key][name], value), (key, name)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> tuple[subprocess.Popen, Path]:
    """The uninterrupted run, started once and shared (collected by `_reference`)."""
    tmp = tmp_path_factory.mktemp("reference")
    proc = _start(tmp / "ckpt", tmp / "result.pt", sleep=0.0)
    yield proc, tmp / "result.pt"
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def _reference(reference_run) -> dict:
    proc, result = reference_run
    if proc.returncode is None:
        _finish(proc)
    return torch.load(result, weights_only=True)


def test_resume_after_sigkill_is_bit_identical(tmp_path, reference_run):
    out_dir = tmp_path / "ckpt"
    victim = _start(out_dir, tmp_path / "killed.pt", sleep=0.1)
    killed_at = _wait_for_checkpoint(out_dir, 4, victim)  # mid-epoch of epoch 1, mid-way through training
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert not (tmp_path / "killed.pt").exists()
    resumed = _start(out_dir, tmp_path / "resumed.pt", sleep=0.0, resume=True)
    _finish(resumed)
    result = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert killed_at < MAX_STEPS
    _assert_same_run(result, _reference(reference_run))


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, reference_run):
    out_dir = tmp_path / "ckpt"
    proc = _start(out_dir, tmp_path / "stopped.pt", sleep=0.1)
    _wait_for_checkpoint(out_dir, 2, proc)
    proc.send_signal(signal.SIGTERM)
    _finish(proc)  # exit status 0: fit returned normally
    stopped = torch.load(tmp_path / "stopped.pt", weights_only=True)
    assert stopped["interrupted"] and stopped["step"] < MAX_STEPS
    assert load_checkpoint(out_dir / LAST)["step"] == stopped["step"]  # the step it finished was saved
    resumed = _start(out_dir, tmp_path / "resumed.pt", sleep=0.0, resume=True)
    _finish(resumed)
    _assert_same_run(torch.load(tmp_path / "resumed.pt", weights_only=True), _reference(reference_run))


# ---- in-process: SIGTERM to ourselves, resume from a path and from previous.pt --------------------------


def _run(out_dir: Path, stop_at: int | None = None, resume=None, max_steps: int = 6) -> Trainer:
    torch.manual_seed(0)
    model = TinyNet(dropout=0.3)
    calls = []

    def transform(images, labels):
        calls.append(1)
        if stop_at is not None and len(calls) == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step: the step still completes
        return images + 0.1 * torch.randn_like(images), labels

    trainer = Trainer(model, max_steps=max_steps, lr=1e-2, out_dir=out_dir, log_every=1, progress=False,
                      batch_transform=transform, ema_decay=0.8)
    trainer.fit(toy_loader(n=16, shuffle=True), resume=resume)
    return trainer


def _same_weights(a: Trainer, b: Trainer) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_in_process_sigterm_and_resume_from_path_and_previous(tmp_path, caplog):
    reference = _run(tmp_path / "ref")
    handler = signal.getsignal(signal.SIGTERM)
    stopped = _run(tmp_path / "run", stop_at=3)  # SIGTERM during step 3 of 6
    assert stopped.interrupted and stopped.step == 3
    assert signal.getsignal(signal.SIGTERM) == handler  # fit put the previous handler back
    resumed = _run(tmp_path / "run", resume=tmp_path / "run" / LAST)
    assert resumed.step == 6 and _same_weights(resumed, reference)
    strip = [{k: v for k, v in h.items() if k != "samples_per_sec"} for h in reference.history]
    assert [{k: v for k, v in h.items() if k != "samples_per_sec"} for h in resumed.history] == strip

    # previous.pt: the epoch-end checkpoint after step 4 (4 batches an epoch), last.pt the final one
    (tmp_path / "run" / LAST).write_bytes(b"truncated")
    with caplog.at_level(logging.WARNING, logger="cvzoo.train"):
        again = _run(tmp_path / "run", resume="auto")
    assert "resuming from the previous checkpoint" in caplog.text and PREVIOUS in caplog.text
    assert again.step == 6 and _same_weights(again, reference)


def test_resume_auto_starts_fresh_without_checkpoints_and_rejects_foreign_files(tmp_path):
    trainer = _run(tmp_path / "empty", resume="auto", max_steps=1)
    assert trainer.step == 1
    bad = tmp_path / "weights.pt"
    torch.save(TinyNet().state_dict(), bad)
    with pytest.raises(CheckpointError, match="plain state_dict"):
        _run(tmp_path / "x", resume=bad, max_steps=1)
