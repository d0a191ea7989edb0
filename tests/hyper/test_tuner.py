"""The tuner: pruning stops a trial that learns nothing, SQLite studies resume to a total, bad arguments are refused."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch.utils.data import TensorDataset

from cvzoo.hyper import Candidate, TrainChoice, classifier_space, hyper_classifier
from cvzoo.hyper.tuner import make_objective, make_pruner, tune

optuna = pytest.importorskip("optuna")
pytestmark = pytest.mark.usefixtures("one_thread")
optuna.logging.set_verbosity(optuna.logging.WARNING)


def _quadrants(n: int, seed: int) -> TensorDataset:
    """(1, 32, 32) images in [0, 1] whose bright quadrant is the label (4 classes): learnt in a few steps."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    images = torch.rand(n, 1, 32, 32, generator=g) * 0.3
    for k in range(4):
        r, c = divmod(k, 2)
        images[labels == k, :, 16 * r:16 * r + 16, 16 * c:16 * c + 16] += 0.7
    return TensorDataset(images, labels)


@pytest.fixture(scope="module")
def data():
    return _quadrants(64, 0), _quadrants(32, 1)


def lr_space(trial):
    """A user-written space: the default architecture, only the learning rate searched."""
    lr = trial.suggest_float("lr", 1e-9, 1e-2, log=True)
    return Candidate(hyper_classifier(num_classes=4, in_channels=1), TrainChoice(lr=lr, augment="none"))


def test_median_pruner_stops_the_trial_that_learns_nothing(data):
    steps, eval_every = 16, 4
    study = optuna.create_study(direction="maximize", pruner=make_pruner("median", steps, eval_every))
    for lr in (3e-3, 3e-3, 3e-3, 1e-9):  # three that learn, then one that cannot move from its initial weights
        study.enqueue_trial({"lr": lr})
    objective = make_objective(lr_space, *data, steps=steps, eval_every=eval_every, batch_size=16, device="cpu")
    study.optimize(objective, n_trials=4)
    learners, frozen = study.trials[:3], study.trials[3]
    assert [t.state.name for t in learners] == ["COMPLETE"] * 3
    assert all(t.value >= 0.9 for t in learners), [t.value for t in learners]
    assert frozen.state.name == "PRUNED"
    # reported at each evaluation; never pruned at its first (the pruner's warm-up), stopped before the end
    assert sorted(frozen.intermediate_values) == list(range(eval_every, frozen.last_step + 1, eval_every))
    assert 2 * eval_every <= frozen.last_step < steps
    assert frozen.user_attrs["num_parameters"] == sum(p.numel() for p in hyper_classifier(4, 1).parameters())


def _finished(study):
    return [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]


def test_sqlite_study_resumes_to_the_total(data, tmp_path):
    space = partial(classifier_space, num_classes=4, in_channels=1, augments=("none", "flip"))
    storage = f"sqlite:///{tmp_path / 'sub' / 'study.db'}"
    kwargs = dict(steps=4, batch_size=16, storage=storage, study_name="s", sampler="random", pruner="none",
                  device="cpu")
    lines: list[str] = []
    first = tune(space, *data, n_trials=2, log=lines.append, **kwargs)
    assert len(_finished(first.study)) == 2 and len(lines) == 2
    before = [(t.number, t.params, t.value, t.datetime_start) for t in first.study.trials]

    second = tune(space, *data, n_trials=3, log=lines.append, **kwargs)
    loaded = optuna.load_study(study_name="s", storage=storage)  # what the file holds
    assert len(_finished(loaded)) == 3
    assert [(t.number, t.params, t.value, t.datetime_start) for t in loaded.trials[:2]] == before
    assert loaded.trials[2].params not in (before[0][1], before[1][1])  # the reseeded sampler draws anew
    assert lines[2] == "study 's': 2 finished trial(s) kept, 1 to run"
    assert second.best_value == max(t.value for t in loaded.trials)
    assert second.builder_call == loaded.best_trial.user_attrs["builder_call"]
    assert second.to_dict()["trials"] == {"complete": 3}

    third = tune(space, *data, n_trials=3, log=lines.append, **kwargs)  # finished already: runs nothing
    assert len(third.study.trials) == 3 and lines[-1] == "study 's': 3 finished trial(s) kept, 0 to run"
    with pytest.raises(ValueError, match="was run with steps=4 \\(now 5\\)"):
        tune(space, *data, n_trials=4, **{**kwargs, "steps": 5})

    namespace: dict = {}
    exec(second.code, namespace)
    assert namespace["model"](torch.rand(2, 1, 32, 32)).logits.shape == (2, 4)


@pytest.mark.parametrize("kwargs, match", [
    ({"n_trials": 0}, "n_trials must be an int >= 1, got 0"),
    ({"steps": 0}, "steps must be an int >= 1, got 0"),
    ({"batch_size": 100}, "batch_size=100 exceeds the 64 training images"),
    ({"storage": "study.db"}, "storage must be None, an optuna storage or a database URL .* got 'study.db'"),
    ({"storage": "nosuchdb://x"}, "storage 'nosuchdb://x' could not be opened"),
    ({"direction": "up"}, "direction must be 'maximize' or 'minimize', got 'up'"),
    ({"sampler": "grid"}, "sampler must be one of .* got 'grid'"),
    ({"pruner": "asha"}, "pruner must be one of .* got 'asha'"),
    ({"timeout": -1}, "timeout must be a positive number"),
])
def test_bad_arguments_are_refused_before_training(data, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tune(lr_space, *data, **{"steps": 2, "batch_size": 16, "log": None, **kwargs})


def test_a_space_must_return_a_model(data):
    study = optuna.create_study()
    with pytest.raises(ValueError, match="must return a Candidate or an nn.Module, got dict"):
        study.optimize(make_objective(lambda t: {}, *data, steps=1, batch_size=16, device="cpu"), n_trials=1)
