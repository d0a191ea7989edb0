import math

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, OneCycleLR, StepLR

from cvzoo.train.schedules import (
    build_scheduler,
    constant,
    one_cycle,
    schedule_function,
    step_decay,
    warmup_cosine,
)

LR = 0.1


def _optimizer(lr: float = LR) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def _torch_lrs(scheduler, steps: int) -> list[float]:
    """The lr each optimizer step runs at, as the trainer uses a scheduler: read, step the optimizer, step it."""
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("min_ratio", [0.0, 0.1])
def test_cosine_without_warmup_matches_cosine_annealing_lr(min_ratio):
    total = 50
    ref = _torch_lrs(CosineAnnealingLR(_optimizer(), T_max=total, eta_min=min_ratio * LR), total)
    ours = [LR * warmup_cosine(t, total_steps=total, min_ratio=min_ratio) for t in range(total)]
    assert ours == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_warmup_cosine_closed_form():
    total, warmup = 20, 5
    for t in range(warmup):
        assert warmup_cosine(t, total_steps=total, warmup_steps=warmup) == pytest.approx((t + 1) / warmup)
    for t in range(warmup, total + 3):
        progress = min(1.0, (t - warmup) / (total - warmup))
        expected = 0.5 * (1 + math.cos(math.pi * progress))
        assert warmup_cosine(t, total_steps=total, warmup_steps=warmup) == pytest.approx(expected, abs=1e-15)
    assert warmup_cosine(total, total_steps=total, warmup_steps=warmup) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("anneal", ["cos", "linear"])
@pytest.mark.parametrize("total,pct", [(100, 0.3), (37, 0.25), (10, 0.5)])
def test_one_cycle_matches_one_cycle_lr(anneal, total, pct):
    opt = _optimizer()
    ref = _torch_lrs(OneCycleLR(opt, max_lr=LR, total_steps=total, pct_start=pct, anneal_strategy=anneal,
                                cycle_momentum=False, div_factor=25.0, final_div_factor=1e4), total)
    ours = [LR * one_cycle(t, total_steps=total, pct_start=pct, anneal=anneal) for t in range(total)]
    assert ours == pytest.approx(ref, rel=1e-12, abs=1e-15)
    assert one_cycle(0, total_steps=total, pct_start=pct) == pytest.approx(1 / 25)
    assert one_cycle(total - 1, total_steps=total, pct_start=pct) == pytest.approx(1 / 25e4)


@pytest.mark.parametrize("step_size,gamma", [(3, 0.1), (7, 0.5), (1, 0.9)])
def test_step_decay_matches_step_lr(step_size, gamma):
    ref = _torch_lrs(StepLR(_optimizer(), step_size=step_size, gamma=gamma), 25)
    ours = [LR * step_decay(t, step_size=step_size, gamma=gamma) for t in range(25)]
    assert ours == pytest.approx(ref, rel=1e-12)


def test_step_decay_and_constant_warmup():
    assert [step_decay(t, step_size=2, gamma=0.5, warmup_steps=4) for t in range(8)] == pytest.approx(
        [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 0.5, 0.5])
    assert [constant(t, warmup_steps=2) for t in range(4)] == [0.5, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("name", ["cosine", "onecycle", "step", "constant"])
def test_build_scheduler_runs_the_named_function(name):
    total, warmup = 30, 6
    opt = _optimizer()
    lrs = _torch_lrs(build_scheduler(opt, name, total_steps=total, warmup_steps=warmup), total)
    fn = schedule_function(name, total_steps=total, warmup_steps=warmup)
    assert lrs == pytest.approx([LR * fn(t) for t in range(total)], rel=1e-12)
    if name != "onecycle":  # one-cycle has its own start (max_lr / 25)
        assert lrs[:warmup] == pytest.approx([LR * (t + 1) / warmup for t in range(warmup)])


def test_step_schedule_decays_at_thirds():
    fn = schedule_function("step", total_steps=30, warmup_steps=0)
    assert [fn(t) for t in (0, 9, 10, 19, 20, 29)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_build_scheduler_takes_a_callable():
    opt = _optimizer()
    assert _torch_lrs(build_scheduler(opt, lambda t: 1 / (t + 1), total_steps=None), 3) == pytest.approx(
        [LR, LR / 2, LR / 3])


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="schedule must be one of .* got 'linear'"):
        schedule_function("linear", total_steps=10)
    with pytest.raises(ValueError, match="schedule='cosine' needs the total number of steps"):
        schedule_function("cosine", total_steps=None)
    with pytest.raises(ValueError, match="total_steps must be a positive int, got 0"):
        schedule_function("cosine", total_steps=0)
    with pytest.raises(ValueError, match="warmup_steps must be a non-negative int, got -1"):
        schedule_function("step", total_steps=10, warmup_steps=-1)
    with pytest.raises(ValueError, match="warmup_steps < total_steps"):
        schedule_function("onecycle", total_steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="anneal must be 'cos' or 'linear', got 'exp'"):
        one_cycle(0, total_steps=10, anneal="exp")
