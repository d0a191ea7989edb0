import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from train_toys import TinyNet, reference_sgd_step, sgd, toy_data, toy_loader

from cvzoo.train.checkpoint import LAST, load_checkpoint
from cvzoo.train.data import to_device
from cvzoo.train.roundtrip import StateRoundTripError
from cvzoo.train.trainer import LossModule, NonFiniteLossError, Trainer, default_optimizer


def _trainer(model=None, **kwargs) -> Trainer:
    kwargs.setdefault("max_steps", 2)
    kwargs.setdefault("progress", False)
    return Trainer(model if model is not None else TinyNet(), **kwargs)


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---- arguments ---------------------------------------------------------------------------------------

BAD_ARGUMENTS = [
    ({"grad_accum": 0}, "grad_accum must be an int >= 1, got 0"),
    ({"grad_accum": 1.5}, "grad_accum must be an int >= 1, got 1.5"),
    ({"amp": "fp8"}, "amp must be None, 'bf16' or 'fp16', got 'fp8'"),
    ({"schedule": "linear"}, "schedule must be one of .* got 'linear'"),
    ({"strategy": "deepspeed"}, "strategy must be one of .* got 'deepspeed'"),
    ({"strategy": "ddp"}, "strategy='ddp' needs a torchrun launch"),
    ({"max_steps": None, "max_epochs": None}, "max_steps and max_epochs are both None"),
    ({"max_steps": 0}, "max_steps must be an int >= 1 or None, got 0"),
    ({"max_epochs": -1}, "max_epochs must be an int >= 1 or None, got -1"),
    ({"lr": 0.0}, "lr must be a positive finite number, got 0.0"),
    ({"lr": float("nan")}, "lr must be a positive finite number, got nan"),
    ({"weight_decay": -0.1}, "weight_decay must be >= 0, got -0.1"),
    ({"clip_grad_norm": 0}, "clip_grad_norm must be a positive number or None, got 0"),
    ({"ema_decay": 1.0}, "ema_decay must lie in \\(0, 1\\) or be None, got 1.0"),
    ({"warmup_steps": -2}, "warmup_steps must be an int >= 0, got -2"),
    ({"max_nonfinite": 0}, "max_nonfinite must be an int >= 1, got 0"),
    ({"checkpoint_every": 0}, "checkpoint_every must be an int >= 1 or None, got 0"),
    ({"checkpoint_every": 5}, "checkpoint_every=5 needs out_dir"),
    ({"log_every": 0}, "log_every must be an int >= 1, got 0"),
    ({"eval_every": 0}, "eval_every must be an int >= 1 or None, got 0"),
    ({"device": "tpu:7"}, "device must be 'auto' or a torch device, got 'tpu:7'"),
    ({"tracker": object()}, "tracker must have a log\\(metrics, step\\) method, got object"),
    ({"compile": "yes"}, "compile must be a bool or a dict of torch.compile arguments, got 'yes'"),
    ({"rebuild": 3}, "rebuild must be callable or None, got int"),
    ({"optimizer": "adam"}, "optimizer must be an Optimizer, a callable model -> Optimizer, or None, got str"),
]


@pytest.mark.parametrize("kwargs,message", BAD_ARGUMENTS, ids=[m[:30] for _, m in BAD_ARGUMENTS])
def test_bad_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _trainer(**kwargs)


def test_model_without_loss_and_bad_loss_output():
    with pytest.raises(ValueError, match="model must be an nn.Module with a loss\\(inputs, targets\\) method"):
        Trainer(nn.Linear(2, 2), max_steps=1)

    class TensorLoss(TinyNet):
        def loss(self, images, labels):
            return super().loss(images, labels)["loss"]

    with pytest.raises(ValueError, match="model.loss must return a dict .* got Tensor"):
        _trainer(TensorLoss()).fit(toy_loader())
    with pytest.raises(ValueError, match="train_loader must yield \\(inputs, targets\\) pairs, got a Tensor"):
        _trainer().fit([torch.zeros(2, 3, 8, 8)])
    with pytest.raises(ValueError, match="resume must be None, 'auto' or a checkpoint path, got 3"):
        _trainer().fit(toy_loader(), resume=3)
    with pytest.raises(ValueError, match="resume='auto' needs out_dir"):
        _trainer().fit(toy_loader(), resume="auto")


def test_cosine_needs_a_length_or_max_steps():
    class NoLen:
        def __iter__(self):
            return iter(toy_loader())

    with pytest.raises(ValueError, match="schedule='cosine' needs the total number of steps"):
        Trainer(TinyNet(), max_epochs=1, progress=False).fit(NoLen())
    trainer = Trainer(TinyNet(), max_epochs=1, schedule="constant", progress=False)
    trainer.fit(NoLen())
    assert trainer.step == 6 and trainer.epoch == 1


# ---- the loop ----------------------------------------------------------------------------------------


def test_fit_learns_and_logs():
    torch.manual_seed(0)
    trainer = Trainer(TinyNet(norm="group"), max_epochs=8, lr=3e-2, log_every=6, progress=False)
    val = toy_loader(n=16, seed=1)
    metrics = trainer.fit(toy_loader(shuffle=True), val_loader=val)
    train_logs = [h for h in trainer.history if "train/loss" in h]
    assert [h["step"] for h in train_logs] == list(range(6, 49, 6))
    assert train_logs[-1]["train/loss"] < 0.6 * train_logs[0]["train/loss"]
    assert {"train/ce", "train/logit_l2", "lr", "samples_per_sec", "epoch"} <= set(train_logs[0])
    val_logs = [h for h in trainer.history if "val/loss" in h]
    assert [h["step"] for h in val_logs] == list(range(6, 49, 6))  # one per epoch end
    assert metrics["step"] == 48 and metrics["val/loss"] == val_logs[-1]["val/loss"]
    model = trainer.model.eval()  # the default evaluation is the sample-weighted mean of model.loss
    with torch.no_grad():
        images, labels = val.dataset.tensors
        expected = model.loss(images, labels)["loss"].item()
    assert metrics["val/loss"] == pytest.approx(expected, rel=1e-5)


def test_max_steps_stops_within_an_epoch_and_schedule_reaches_zero():
    trainer = _trainer(max_steps=4, lr=0.1, log_every=1, warmup_steps=1)
    trainer.fit(toy_loader())
    assert trainer.step == 4 and trainer.epoch == 0 and trainer.batch_in_epoch == 4
    lrs = [h["lr"] for h in trainer.history if "lr" in h]
    expected = [0.1 * (1.0 if t < 1 else 0.5 * (1 + math.cos(math.pi * (t - 1) / 3))) for t in range(4)]
    assert lrs == pytest.approx(expected)


def test_default_optimizer_decays_only_weights():
    model = TinyNet()
    groups = default_optimizer(model, lr=1e-3, weight_decay=0.1).param_groups
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert decayed == {id(model.conv.weight), id(model.fc.weight)}
    assert len(groups[1]["params"]) == 4  # conv and fc biases, norm weight and bias


def test_batch_transform_runs_on_device_batches():
    seen = []

    class Recorder(TinyNet):
        def loss(self, images, labels):
            seen.append(images.clone())
            return super().loss(images, labels)

    def transform(images, labels):
        return images * 0 + 7, labels

    _trainer(Recorder(), max_steps=1, batch_transform=transform).fit(toy_loader())
    assert all(torch.all(x == 7) for x in seen)


def test_bad_device_names_the_argument():
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda' but CUDA is not available"):
            _trainer(device="cuda")


def test_to_device_recurses():
    from cvzoo.detection.structures import TargetBatch

    meta = torch.device("meta")
    batch = ([torch.zeros(2)], {"boxes": torch.zeros(1, 4), "n": 3},
             TargetBatch(torch.zeros(1, 2, 4), torch.zeros(1, 2, dtype=torch.long)), "name")
    out = to_device(batch, meta)
    assert out[0][0].is_meta and out[1]["boxes"].is_meta and out[1]["n"] == 3 and out[3] == "name"
    assert isinstance(out[2], TargetBatch) and out[2].boxes.is_meta and out[2].labels.is_meta


# ---- gradient accumulation ---------------------------------------------------------------------------


def test_accumulated_gradients_equal_the_big_batch():
    torch.manual_seed(0)
    model = TinyNet(norm="group")
    reference = TinyNet(norm="group")
    reference.load_state_dict(model.state_dict())
    loader = toy_loader(n=12, batch_size=4)
    expected = reference_sgd_step(reference, list(loader))  # one step on all 12 samples
    _trainer(model, max_steps=1, grad_accum=3, optimizer=sgd(), schedule="constant").fit(loader)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, expected[name], rtol=0, atol=1e-6, msg=name)


def test_a_short_last_group_of_an_epoch_is_its_own_mean():
    torch.manual_seed(0)
    model = TinyNet(norm="group")
    reference = TinyNet(norm="group")
    reference.load_state_dict(model.state_dict())
    loader = toy_loader(n=12, batch_size=4)  # 3 batches, grad_accum 2: steps of 2 and 1 batches
    batches = list(loader)
    reference_sgd_step(reference, batches[:2])
    with torch.no_grad():
        for p in reference.parameters():
            p.sub_(p.grad)
    expected = reference_sgd_step(reference, batches[2:])
    trainer = _trainer(model, max_steps=None, max_epochs=1, grad_accum=2, optimizer=sgd(), schedule="constant")
    trainer.fit(loader)
    assert trainer.step == 2
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, expected[name], rtol=0, atol=1e-6, msg=name)


# ---- AMP, compile, channels_last, clipping, EMA -------------------------------------------------------


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_trains_with_fp32_weights(amp, tmp_path):
    trainer = _trainer(max_steps=3, amp=amp, lr=1e-2, out_dir=tmp_path, log_every=1)
    metrics = trainer.fit(toy_loader())
    assert math.isfinite(metrics["train/loss"])
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert (trainer.scaler is not None) == (amp == "fp16")
    scaler_state = load_checkpoint(tmp_path / LAST)["scaler"]
    assert (scaler_state is not None and scaler_state["scale"] > 0) if amp == "fp16" else scaler_state is None


def test_compile_eager_backend_matches_eager_training():
    torch.manual_seed(0)
    a, b = TinyNet(), TinyNet()
    b.load_state_dict(a.state_dict())
    _trainer(a, max_steps=3).fit(toy_loader())
    trainer = _trainer(b, max_steps=3, compile={"backend": "eager"})
    trainer.fit(toy_loader())
    assert type(trainer._forward).__name__ == "OptimizedModule"
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.slow
def test_compile_inductor():
    trainer = _trainer(max_steps=2, compile=True)
    assert math.isfinite(trainer.fit(toy_loader())["train/loss"])


def test_channels_last_model_and_inputs():
    seen = []

    class Recorder(TinyNet):
        def loss(self, images, labels):
            seen.append(images.is_contiguous(memory_format=torch.channels_last))
            return super().loss(images, labels)

    torch.manual_seed(0)
    model, plain = Recorder(), TinyNet()
    plain.load_state_dict(model.state_dict())
    _trainer(model, max_steps=2, channels_last=True, optimizer=sgd(0.1)).fit(toy_loader())
    _trainer(plain, max_steps=2, optimizer=sgd(0.1)).fit(toy_loader())  # SGD: Adam would amplify rounding
    assert seen and all(seen)
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_clip_grad_norm_bounds_the_update():
    torch.manual_seed(0)
    model = TinyNet(norm="group")
    before = _params(model)
    trainer = _trainer(model, max_steps=1, optimizer=sgd(), schedule="constant", clip_grad_norm=1e-3, log_every=1)
    trainer.fit(toy_loader())
    update = torch.cat([(before[n] - p.detach()).flatten() for n, p in model.named_parameters()])
    assert update.norm().item() == pytest.approx(1e-3, rel=1e-4)  # SGD lr 1: the update is the clipped gradient
    assert trainer.history[0]["grad_norm"] > 1e-3  # the logged norm is the one before clipping


def test_ema_is_updated_and_evaluated():
    seen = []

    def evaluate(model, loader):
        seen.append(model)
        return {"acc": 0.5, "test/custom": 1.0}

    trainer = _trainer(max_steps=None, max_epochs=2, ema_decay=0.9)
    metrics = trainer.fit(toy_loader(), evaluate=evaluate)
    assert trainer.ema.updates == 12
    assert len(seen) == 2 and all(m is trainer.ema.module for m in seen)
    assert metrics["val/acc"] == 0.5 and metrics["test/custom"] == 1.0


def test_eval_every_steps():
    calls = []
    trainer = _trainer(max_steps=5, eval_every=2)
    trainer.fit(toy_loader(), evaluate=lambda model, loader: calls.append(1) or {"x": 1.0})
    assert [h["step"] for h in trainer.history if "val/x" in h] == [2, 4, 5]  # and once at the end


# ---- NaN guard ---------------------------------------------------------------------------------------


class NaNAt(TinyNet):
    """TinyNet whose loss is NaN on the given (0-based) calls."""

    def __init__(self, bad_calls) -> None:
        super().__init__(norm="group")
        self.bad_calls = set(bad_calls)
        self.calls = 0

    def loss(self, images, labels):
        out = super().loss(images, labels)
        if self.calls in self.bad_calls:
            out = {**out, "loss": out["loss"] * float("nan"), "ce": out["ce"] * float("inf")}
        self.calls += 1
        return out


@pytest.mark.parametrize("amp", [None, "fp16"])
def test_non_finite_loss_skips_the_step_and_warns(amp, caplog):
    model = NaNAt(bad_calls={1})
    trainer = _trainer(model, max_steps=1, optimizer=sgd(0.1), schedule="constant", amp=amp)
    trainer.fit(toy_loader())
    after_first = _params(model)
    trainer.max_steps = 2
    scale = trainer.scaler.get_scale() if amp else None
    with caplog.at_level(logging.WARNING, logger="cvzoo.train"):
        trainer.fit(toy_loader())
    for n, p in model.named_parameters():
        assert torch.equal(p, after_first[n]), n  # the NaN step left the weights alone
    assert all(p.grad is None for p in model.parameters())
    assert "non-finite loss at step 1" in caplog.text and "'ce': inf" in caplog.text
    if amp:
        assert trainer.scaler.get_scale() == scale * 0.5
    trainer.max_steps = 3
    trainer.fit(toy_loader())
    assert any(not torch.equal(p, after_first[n]) for n, p in model.named_parameters())  # training went on


def test_too_many_non_finite_losses_abort():
    model = NaNAt(bad_calls=range(2, 100))
    trainer = _trainer(model, max_steps=20, max_nonfinite=3)
    message = "3 non-finite losses in a row \\(max_nonfinite=3\\), the last at step 4"
    with pytest.raises(NonFiniteLossError, match=message):
        trainer.fit(toy_loader())
    model = NaNAt(bad_calls={1, 2, 4, 5, 7, 8})  # never 3 in a row
    assert _trainer(model, max_steps=10, max_nonfinite=3).fit(toy_loader())["step"] == 10


# ---- save/load check ---------------------------------------------------------------------------------


class RuntimeBuffer(TinyNet):
    """A non-persistent buffer changed after construction: its value is not in the state_dict."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("offset", torch.zeros(()), persistent=False)

    def loss(self, images, labels):
        return super().loss(images + self.offset, labels)


class LazyScale(TinyNet):
    """A parameter created at the first call."""

    def loss(self, images, labels):
        if not hasattr(self, "scale"):
            self.scale = nn.Parameter(torch.rand(()))
        return super().loss(images * self.scale, labels)


class RandomLoss(TinyNet):
    """A loss that draws random numbers in eval mode too, as the RoI samplers of two-stage detectors do."""

    def loss(self, images, labels):
        return super().loss(images * (1 + torch.rand(())), labels)


def test_round_trip_check_passes_for_a_loss_that_samples_at_random():
    trainer = _trainer(RandomLoss(), rebuild=RandomLoss, max_steps=1)
    assert trainer.fit(toy_loader())["step"] == 1


def test_round_trip_check_passes_for_a_sound_model():
    trainer = _trainer(TinyNet(dropout=0.5), rebuild=lambda: TinyNet(dropout=0.5), max_steps=1)
    assert trainer.fit(toy_loader())["step"] == 1


@pytest.mark.parametrize("make", [RuntimeBuffer, LazyScale])
def test_round_trip_check_catches_unsaved_state(make):
    model = make()
    if isinstance(model, RuntimeBuffer):
        model.offset.fill_(1.0)
    before = _params(model)
    with pytest.raises(StateRoundTripError, match="save/load check failed: loss term 'loss'"):
        _trainer(model, rebuild=make, max_steps=3).fit(toy_loader())
    for n, p in model.named_parameters():
        if n in before:
            assert torch.equal(p, before[n])  # raised before any optimizer step


def test_round_trip_check_catches_architecture_mismatch():
    with pytest.raises(StateRoundTripError, match="does not load into rebuild"):
        _trainer(TinyNet(), rebuild=lambda: TinyNet(num_classes=5)).fit(toy_loader())


def test_round_trip_check_leaves_the_random_streams_alone():
    torch.manual_seed(0)
    a = TinyNet(dropout=0.5)
    b = TinyNet(dropout=0.5)
    b.load_state_dict(a.state_dict())
    _trainer(a, max_steps=3).fit(toy_loader(shuffle=True))
    _trainer(b, max_steps=3, rebuild=lambda: TinyNet(dropout=0.5)).fit(toy_loader(shuffle=True))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


# ---- tracking and progress ---------------------------------------------------------------------------


class ListTracker:
    def __init__(self) -> None:
        self.records, self.configs, self.closed = [], [], False

    def log(self, metrics, step):
        self.records.append((step, dict(metrics)))

    def log_config(self, config):
        self.configs.append(config)

    def close(self):
        self.closed = True


def test_tracker_receives_logs_and_is_closed():
    tracker = ListTracker()
    _trainer(max_steps=5, log_every=2, tracker=tracker).fit(toy_loader(), evaluate=lambda m, d: {"acc": 1.0})
    steps = [s for s, m in tracker.records if "train/loss" in m]
    assert steps == [2, 4, 5]
    assert (5, {"val/acc": 1.0}) in tracker.records
    assert tracker.configs[0]["max_steps"] == 5 and tracker.closed


def test_a_failing_tracker_never_stops_training():
    class Broken(ListTracker):
        def log(self, metrics, step):
            raise ConnectionError("server down")

    with pytest.warns(RuntimeWarning, match="Broken.log raised ConnectionError: server down") as record:
        trainer = _trainer(max_steps=4, log_every=1, tracker=Broken())
        trainer.fit(toy_loader())
    assert trainer.step == 4
    assert sum("server down" in str(w.message) for w in record) == 1  # warned once


def test_progress_bar(capsys):
    _trainer(max_steps=3, progress=True, log_every=1).fit(toy_loader())
    err = capsys.readouterr().err
    assert "3/3" in err and "loss=" in err and "lr=" in err and "img/s=" in err


def test_loss_module_routes_forward_to_loss():
    model = TinyNet().eval()
    images, labels = toy_data(4).tensors
    out = LossModule(model)(images, labels)
    assert torch.equal(out["loss"], model.loss(images, labels)["loss"])
    assert F.cross_entropy(model(images), labels).item() == pytest.approx(out["ce"].item())


# ---- real zoo models ---------------------------------------------------------------------------------


def test_trains_zoo_classifier_and_detector():
    from cvzoo.zoo import create_model

    torch.manual_seed(0)
    detector = create_model("fcos_micro", num_classes=3)
    images = torch.rand(2, 3, 64, 64)
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]  # list of dicts, moved
    trainer = _trainer(detector, max_steps=2, ema_decay=0.9, rebuild=lambda: create_model("fcos_micro", num_classes=3),
                       batch_transform=lambda x, y: (detector.signature.normalize(x), y))
    metrics = trainer.fit([(images, targets)] * 2)
    assert {"train/loss", "train/classification", "train/box_regression"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())

    classifier = create_model("resnet_micro_classifier", num_classes=4)
    trainer = _trainer(classifier, max_steps=2, channels_last=True, amp="bf16",
                       rebuild=lambda: create_model("resnet_micro_classifier", num_classes=4),
                       batch_transform=lambda x, y: (classifier.signature.normalize(x), y))
    assert math.isfinite(trainer.fit([(torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))] * 2)["train/loss"])
