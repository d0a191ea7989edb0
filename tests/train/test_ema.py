from collections.abc import Iterator

import pytest
import torch
from torch import nn

from cvzoo.train.ema import ModelEMA


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def _random_walk(model: nn.Module, steps: int) -> Iterator[dict[str, torch.Tensor]]:
    """Moves the parameters randomly `steps` times, yielding a float64 copy after each move."""
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        yield {n: p.detach().double().clone() for n, p in model.named_parameters()}


def _closed_form(p0: dict, snapshots: list[dict], decays: list[float]) -> dict:
    """ema_n = prod(d) * p_0 + sum_t (1 - d_t) * prod_{s > t} d_s * p_t."""
    out = {}
    for name in p0:
        total = p0[name] * torch.tensor(decays, dtype=torch.float64).prod()
        for t, snap in enumerate(snapshots):
            tail = torch.tensor(decays[t + 1:], dtype=torch.float64).prod()
            total = total + (1 - decays[t]) * tail * snap[name]
        out[name] = total
    return out


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_matches_closed_form(warmup):
    model = _model()
    decay = 0.8
    ema = ModelEMA(model, decay=decay, warmup=warmup)
    p0 = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    snapshots = []
    for snap in _random_walk(model, 12):
        ema.update(model)
        snapshots.append(snap)
    n = len(snapshots)
    decays = [min(decay, (1 + k) / (10 + k)) if warmup else decay for k in range(1, n + 1)]
    expected = _closed_form(p0, snapshots, decays)
    for name, p in ema.module.named_parameters():
        torch.testing.assert_close(p.double(), expected[name], rtol=1e-5, atol=1e-5)
    assert ema.updates == n


def test_warmup_decay_schedule():
    ema = ModelEMA(_model(), decay=0.999)
    assert ema.current_decay() == pytest.approx(2 / 11)
    ema.updates = 10_000
    assert ema.current_decay() == 0.999
    assert ModelEMA(_model(), decay=0.9, warmup=False).current_decay() == 0.9


def test_buffers_are_copied_not_averaged():
    model = _model()
    ema = ModelEMA(model, decay=0.99, warmup=False)
    model.train()
    model(torch.randn(16, 3) * 5 + 3)  # moves the BatchNorm running statistics
    ema.update(model)
    bn_model, bn_ema = model[1], ema.module[1]
    assert torch.equal(bn_ema.running_mean, bn_model.running_mean)
    assert torch.equal(bn_ema.running_var, bn_model.running_var)
    assert torch.equal(bn_ema.num_batches_tracked, bn_model.num_batches_tracked)


def test_ema_module_is_frozen_eval_copy():
    model = _model()
    ema = ModelEMA(model, decay=0.9)
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(ema.module.parameters(), model.parameters()))


def test_state_dict_round_trip_continues_identically():
    model = _model()
    ema = ModelEMA(model, decay=0.9)
    for _ in _random_walk(model, 3):
        ema.update(model)
    restored = ModelEMA(_model(), decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 3
    for _ in _random_walk(model, 2):
        ema.update(model)
        restored.update(model)
    for a, b in zip(ema.module.state_dict().values(), restored.module.state_dict().values()):
        assert torch.equal(a, b)


def test_update_from_compiled_model_unwraps():
    model = _model()
    ema = ModelEMA(model, decay=0.5, warmup=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(torch.compile(model, backend="eager"))  # keys of the wrapper carry _orig_mod.
    for p_ema, p in zip(ema.module.parameters(), model.parameters()):
        torch.testing.assert_close(p_ema, p - 0.5)


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 2])
def test_bad_decay(decay):
    with pytest.raises(ValueError, match=f"decay must lie in \\(0, 1\\), got {decay}"):
        ModelEMA(_model(), decay=decay)
