"""The trainer's optimisation-phase hook (GANs): phases in order, one optimizer each, no gradient leaking
between phases, checkpoints of every optimizer, and the arguments it refuses."""

import pytest
import torch
from torch import nn
from train_toys import toy_loader

from cvzoo.train.checkpoint import LAST, load_checkpoint
from cvzoo.train.trainer import Trainer


class TwoPlayers(nn.Module):
    """Two scalars trained in turn: phase "first" moves `a` on (a - 2b)^2 (whose backward also reaches b),
    phase "second" moves `b` on (b - a)^2 + mean(x) * 0. With plain SGD every update is -lr * grad, so the
    parameters reveal which gradients each update saw."""

    phases = ("first", "second")

    def __init__(self, a: float = 1.0, b: float = 3.0, lr_first: float = 0.1, lr_second: float = 0.2) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.b = nn.Parameter(torch.tensor(b))
        self.lrs = {"first": lr_first, "second": lr_second}
        self.calls: list[str | None] = []
        self.poison_first = False

    def configure_optimizers(self, lr, weight_decay):
        return {"first": torch.optim.SGD([self.a], lr=self.lrs["first"]),
                "second": torch.optim.SGD([self.b], lr=self.lrs["second"])}

    def loss(self, images, targets, phase=None):
        self.calls.append(phase)
        first = (self.a - 2 * self.b) ** 2
        if self.poison_first:
            first = first * float("nan")
        second = (self.b - self.a) ** 2 + images.mean() * 0
        if phase == "first":
            return {"loss": first, "loss_first": first.detach()}
        if phase == "second":
            return {"loss": second, "loss_second": second.detach()}
        return {"loss": first + second, "loss_first": first.detach(), "loss_second": second.detach()}


def reference(a: float, b: float, steps: int, lr_first: float = 0.1, lr_second: float = 0.2) -> tuple[float, float]:
    """Alternating gradient descent by hand: a on d/da (a - 2b)^2, then b on d/db (b - a_new)^2."""
    for _ in range(steps):
        a = a - lr_first * 2 * (a - 2 * b)
        b = b - lr_second * 2 * (b - a)
    return a, b


def _fit(model, steps=3, **kwargs):
    kwargs.setdefault("schedule", "constant")
    trainer = Trainer(model, max_steps=steps, progress=False, log_every=1, **kwargs)
    trainer.fit(toy_loader(n=16, batch_size=4))
    return trainer


def test_phases_alternate_with_their_own_optimizers_and_no_leaked_gradients():
    model = _fit(TwoPlayers(), steps=3)
    a, b = reference(1.0, 3.0, 3)
    assert model.model.a.item() == pytest.approx(a, rel=1e-6)
    assert model.model.b.item() == pytest.approx(b, rel=1e-6)
    assert model.model.calls == ["first", "second"] * 3
    assert model.model.a.grad is None and model.model.b.grad is None


def test_phase_terms_are_logged_together_with_the_summed_loss():
    trainer = _fit(TwoPlayers(), steps=1)
    record = next(r for r in trainer.history if "train/loss" in r)
    assert record["train/loss_first"] == pytest.approx((1.0 - 6.0) ** 2)
    a_new = 1.0 - 0.1 * 2 * (1.0 - 6.0)
    assert record["train/loss_second"] == pytest.approx((3.0 - a_new) ** 2, rel=1e-6)
    assert record["train/loss"] == pytest.approx(record["train/loss_first"] + record["train/loss_second"], rel=1e-6)


def test_a_non_finite_phase_skips_only_its_own_update(caplog):
    model = TwoPlayers()
    model.poison_first = True
    trainer = _fit(model, steps=1, max_nonfinite=3)
    assert model.a.item() == 1.0  # the first phase's update was skipped
    assert model.b.item() == pytest.approx(3.0 - 0.2 * 2 * (3.0 - 1.0))  # the second still ran
    assert trainer._nonfinite_in_row == 1
    assert "non-finite loss in phase 'first'" in caplog.text


def test_checkpoints_hold_every_phase_and_resume_continues_the_run(tmp_path):
    def adam(m):
        return {"first": torch.optim.Adam([m.a], lr=0.05), "second": torch.optim.Adam([m.b], lr=0.05)}

    _fit(TwoPlayers(), steps=2, out_dir=tmp_path, optimizer=adam)
    ckpt = load_checkpoint(tmp_path / LAST)
    assert set(ckpt["optimizer"]) == {"first", "second"} and set(ckpt["scheduler"]) == {"first", "second"}
    assert ckpt["optimizer"]["first"]["state"][0]["step"] == 2
    straight = _fit(TwoPlayers(), steps=4, optimizer=adam).model
    resumed = Trainer(TwoPlayers(), max_steps=4, progress=False, schedule="constant", out_dir=tmp_path,
                      optimizer=adam)
    resumed.fit(toy_loader(n=16, batch_size=4), resume="auto")
    assert resumed.step == 4
    assert torch.equal(resumed.model.a, straight.a) and torch.equal(resumed.model.b, straight.b)


def test_evaluation_calls_the_loss_without_a_phase():
    model = TwoPlayers()
    trainer = Trainer(model, max_steps=1, progress=False, schedule="constant")
    result = trainer.fit(toy_loader(n=8, batch_size=4), val_loader=toy_loader(n=8, batch_size=4))
    assert None in model.calls and "val/loss_first" in result


BAD = [
    ({"grad_accum": 2}, "grad_accum=2 is not supported for a model trained in phases"),
    ({"optimizer": torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)}, "needs one optimizer per phase"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=["grad_accum", "one optimizer"])
def test_refused_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Trainer(TwoPlayers(), max_steps=1, progress=False, **kwargs)


def test_optimizers_must_be_one_per_phase_in_order():
    model = TwoPlayers()
    trainer = Trainer(model, max_steps=1, progress=False,
                      optimizer=lambda m: {"second": torch.optim.SGD([m.b], lr=0.1),
                                           "first": torch.optim.SGD([m.a], lr=0.1)})
    with pytest.raises(ValueError, match=r"keys \['first', 'second'\] in that order"):
        trainer.fit(toy_loader(n=8, batch_size=4))


def test_phases_need_configure_optimizers_and_distinct_names():
    class NoConfigure(nn.Module):
        phases = ("d", "g")

        def loss(self, images, targets, phase=None):
            return {"loss": images.sum()}

    with pytest.raises(ValueError, match="needs a configure_optimizers"):
        Trainer(NoConfigure(), max_steps=1, progress=False)
    NoConfigure.phases = ("d", "d")
    with pytest.raises(ValueError, match="tuple of distinct phase names"):
        Trainer(NoConfigure(), max_steps=1, progress=False)
