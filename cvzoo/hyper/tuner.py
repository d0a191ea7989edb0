"""The tuner: a search space, trained briefly per trial by cvzoo's Trainer, searched and pruned by Optuna.

    objective = make_objective(space, train_set, val_set, steps=200)   # trial -> validation accuracy
    study.optimize(objective, n_trials=10)                            # plain Optuna, your own study
    result = tune(space, train_set, val_set, n_trials=10, storage="sqlite:///study.db")   # or all of it

Each trial builds `space(trial)` (a `Candidate` or an nn.Module) under `torch.manual_seed(seed)`, trains it
for `steps` optimizer steps (cosine schedule, warmup of a tenth of the steps at most 100), evaluates
every `eval_every` steps and at the end, reports each value with `trial.report(value, step)` and stops
with `optuna.TrialPruned` when the pruner says so. A trial whose loss diverges (`NonFiniteLossError`) is
pruned too. The objective is the last evaluation's value.

Resuming. With a `storage` (`sqlite:///path.db`), the study is created once and loaded by every later
call with the same `study_name`: its trials are kept and count. `n_trials` is the number of *finished*
(complete or pruned) trials the study should hold when `tune` returns, not a number of trials to add
(`study.optimize(n_trials=N)` adds N): rerunning an interrupted `tune` finishes the job, rerunning a
finished one trains nothing and reports the best, and `n_trials=40` after 20 runs 20 more. Trials a
killed process left RUNNING are not counted (they stay RUNNING in the storage). The settings that make
values comparable (steps, eval_every, batch size, metric, data sizes, the space's name) are stored on the
study, and a call with other settings is refused rather than mixing incomparable trials.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cvzoo._optional import require
from cvzoo.hyper.candidate import Candidate, as_candidate
from cvzoo.hyper.space import MODEL_PARAMS

Space = Callable[[Any], Candidate | nn.Module]
Evaluate = Callable[[nn.Module, Iterable], Mapping[str, float]]
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "none")
FINISHED = ("COMPLETE", "PRUNED")


def _optuna():
    return require("optuna", "hyper", "hyperparameter search")


def _check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{' or None' if allow_none else ''}, got {value!r}")


def default_eval_every(steps: int) -> int:
    """Five evaluations (pruning points) a trial."""
    return max(1, steps // 5)


def space_name(space: Space) -> str:
    """A stable name for a space: the function's name (through functools.partial), else the class name."""
    while isinstance(space, functools.partial):
        space = space.func
    return getattr(space, "__name__", type(space).__name__)


def _image_size(dataset: Any) -> tuple[int, int]:
    image = dataset[0][0]
    if not isinstance(image, torch.Tensor) or image.ndim != 3:
        raise ValueError(f"datasets must yield (image (C, H, W) tensor, label) pairs, got "
                         f"{type(image).__name__}{tuple(getattr(image, 'shape', ()))}")
    return tuple(image.shape[-2:])


def make_objective(space: Space, train_data: Any, val_data: Any, *, steps: int = 200, eval_every: int | None = None,
                   batch_size: int = 32, metric: str = "accuracy", evaluate: Evaluate | None = None,
                   seed: int = 0, device: str | torch.device = "auto", num_workers: int = 0,
                   clip_grad_norm: float | None = 10.0) -> Callable[[Any], float]:
    """`objective(trial) -> float` for `study.optimize`: builds `space(trial)`, trains it on `train_data`
    ((image in [0, 1] (C, H, W), label) pairs) and returns `metric` on `val_data`, reporting every
    evaluation to the trial for pruning (see the module docstring).

    `evaluate(model, val_loader) -> {name: value}` defaults to top-1 accuracy (`cvzoo.experiment.evaluate_task`
    for classification), the model in eval mode and the loader yielding unnormalised images.
    """
    if not callable(space):
        raise ValueError(f"space must be a callable trial -> Candidate, got {type(space).__name__}")
    _check_int("steps", steps, 1)
    _check_int("eval_every", eval_every, 1, allow_none=True)
    _check_int("batch_size", batch_size, 1)
    _check_int("seed", seed, 0)
    _check_int("num_workers", num_workers, 0)
    if evaluate is not None and not callable(evaluate):
        raise ValueError(f"evaluate must be callable or None, got {type(evaluate).__name__}")
    for name, data in (("train_data", train_data), ("val_data", val_data)):
        if not hasattr(data, "__len__") or not hasattr(data, "__getitem__") or len(data) == 0:
            raise ValueError(f"{name} must be a non-empty map-style dataset, got {type(data).__name__}")
    if len(train_data) < batch_size:
        raise ValueError(f"batch_size={batch_size} exceeds the {len(train_data)} training images (batches drop "
                         f"the incomplete last one)")
    eval_every = eval_every or default_eval_every(steps)
    image_size = _image_size(train_data)

    def objective(trial: Any) -> float:
        optuna = _optuna()
        from torch.utils.data import DataLoader

        from cvzoo.experiment import evaluate_task, make_batch_transform
        from cvzoo.train import Trainer
        from cvzoo.train.trainer import NonFiniteLossError

        torch.manual_seed(seed)  # every trial starts from the same draw: differences are the configuration's
        candidate = as_candidate(space(trial))
        model = candidate.model
        for key, value in (("builder_call", candidate.builder_call), ("zoo_call", candidate.zoo_call),
                           ("imports", list(candidate.imports) or None)):
            if value is not None:
                trial.set_user_attr(key, value)
        trial.set_user_attr("num_parameters", sum(p.numel() for p in model.parameters()))
        generator = torch.Generator().manual_seed(seed)
        train_loader = DataLoader(train_data, batch_size=batch_size, shuffle=True, drop_last=True,
                                  num_workers=num_workers, generator=generator)
        val_loader = DataLoader(val_data, batch_size=max(batch_size, 64), shuffle=False, num_workers=num_workers)
        settings = candidate.training
        trainer = Trainer(
            model, optimizer=settings.make_optimizer, lr=settings.lr, weight_decay=settings.weight_decay,
            max_steps=steps, clip_grad_norm=clip_grad_norm, warmup_steps=min(100, steps // 10), device=device,
            strategy="single", batch_transform=make_batch_transform(model, "classification", settings.augment,
                                                                    image_size),
            eval_every=eval_every, log_every=max(eval_every, 1), progress=False, seed=seed)
        last: dict[str, float] = {}
        started = time.perf_counter()

        def evaluate_and_report(m: nn.Module, loader: Iterable) -> Mapping[str, float]:
            metrics = evaluate(m, loader) if evaluate is not None else evaluate_task(m, loader, "classification")
            if metric not in metrics:
                raise ValueError(f"metric {metric!r} is not among the evaluated metrics {sorted(metrics)}")
            value = float(metrics[metric])
            last["value"], last["step"] = value, trainer.step
            trial.report(value, trainer.step)
            if trial.should_prune():
                trial.set_user_attr("seconds", time.perf_counter() - started)
                raise optuna.TrialPruned(f"{metric} {value:.4g} at step {trainer.step}")
            return metrics

        try:
            trainer.fit(train_loader, val_loader, evaluate=evaluate_and_report)
        except NonFiniteLossError as err:
            trial.set_user_attr("diverged", str(err))
            raise optuna.TrialPruned(f"diverged at step {trainer.step}: {err}") from err
        trial.set_user_attr("seconds", time.perf_counter() - started)
        if "value" not in last or not math.isfinite(last["value"]):
            raise optuna.TrialPruned(f"{metric} is {last.get('value')} at the end")
        return last["value"]

    return objective


# ---- study construction ---------------------------------------------------------------------------------

def make_storage(storage: Any) -> Any:
    """None (in memory), an Optuna storage, or a database URL (`sqlite:///runs/tune/study.db`; the folder of a
    SQLite file is created) -> what `optuna.create_study(storage=...)` takes."""
    optuna = _optuna()
    if storage is None or isinstance(storage, optuna.storages.BaseStorage):
        return storage
    if not isinstance(storage, str) or "://" not in storage:
        raise ValueError(f"storage must be None, an optuna storage or a database URL such as "
                         f"'sqlite:///runs/tune/study.db', got {storage!r}")
    if storage.startswith("sqlite:///"):
        path = storage[len("sqlite:///"):]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        return optuna.storages.RDBStorage(storage)
    except Exception as err:  # SQLAlchemy: unknown dialect, unreachable database, unreadable file
        raise ValueError(f"storage {storage!r} could not be opened: {type(err).__name__}: {err}") from err


def make_sampler(sampler: Any, seed: int) -> Any:
    """"tpe" (multivariate TPE), "random", or an Optuna sampler as it is."""
    optuna = _optuna()
    if isinstance(sampler, optuna.samplers.BaseSampler):
        return sampler
    if sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"sampler must be one of {SAMPLERS} or an optuna sampler, got {sampler!r}")


def make_pruner(pruner: Any, steps: int, eval_every: int) -> Any:
    """"median": MedianPruner after 3 complete trials, never at a trial's first evaluation; "hyperband":
    HyperbandPruner over [eval_every, steps]; "none"; or an Optuna pruner as it is."""
    optuna = _optuna()
    if isinstance(pruner, optuna.pruners.BasePruner):
        return pruner
    if pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=min(2 * eval_every, steps))
    if pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=eval_every, max_resource=steps)
    if pruner == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"pruner must be one of {PRUNERS} or an optuna pruner, got {pruner!r}")


def finished_trials(study: Any) -> list[Any]:
    """The complete and pruned trials of `study` (those that count toward `n_trials`)."""
    optuna = _optuna()
    states = tuple(getattr(optuna.trial.TrialState, s) for s in FINISHED)
    return study.get_trials(deepcopy=False, states=states)


# ---- result --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TuneResult:
    """The best trial of a study: its value and parameters (`model_params` those of the architecture, the
    zoo builder's keyword arguments), the constructor code that rebuilds its model (`builder_call`,
    `imports`), the zoo builder call (`zoo_call`), and counts of the study's trials by state."""

    study: Any
    best_value: float
    best_params: dict[str, Any]
    best_trial: int
    builder_call: str | None
    zoo_call: str | None
    imports: tuple[str, ...]
    model_params: dict[str, Any]
    counts: dict[str, int]

    @property
    def code(self) -> str | None:
        if self.builder_call is None:
            return None
        return "\n".join(self.imports) + f"\n\nmodel = {self.builder_call}\n"

    def to_dict(self) -> dict[str, Any]:
        """Plain values for best.json."""
        return {"study_name": self.study.study_name, "best_value": self.best_value, "best_trial": self.best_trial,
                "best_params": self.best_params, "model_params": self.model_params,
                "builder_call": self.builder_call, "imports": list(self.imports), "zoo_call": self.zoo_call,
                "trials": self.counts, "user_attrs": dict(self.study.user_attrs)}


def result_of(study: Any, space: Space | None = None) -> TuneResult:
    """The `TuneResult` of a study with at least one complete trial. The builder call is the best trial's
    stored one; for trials run elsewhere without it, `space` replays the best parameters (FixedTrial)."""
    optuna = _optuna()
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        counts = _counts(study)
        raise RuntimeError(f"study {study.study_name!r} has no complete trial ({counts}): nothing to report")
    best = study.best_trial
    attrs = dict(best.user_attrs)
    if space is not None and "builder_call" not in attrs:
        with torch.random.fork_rng(devices=[]):
            candidate = as_candidate(space(optuna.trial.FixedTrial(best.params)))
        attrs.update(builder_call=candidate.builder_call, zoo_call=candidate.zoo_call, imports=candidate.imports)
    return TuneResult(study=study, best_value=float(best.value), best_params=dict(best.params),
                      best_trial=best.number, builder_call=attrs.get("builder_call"), zoo_call=attrs.get("zoo_call"),
                      imports=tuple(attrs.get("imports") or ()),
                      model_params={k: v for k, v in best.params.items() if k in MODEL_PARAMS}, counts=_counts(study))


def _counts(study: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    return counts


# ---- the tuner -------------------------------------------------------------------------------------------

def describe_trial(trial: Any, metric: str = "value") -> str:
    """One line for a finished trial: number, state, value (and step when pruned), time, parameters."""
    params = ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
    seconds = trial.user_attrs.get("seconds")
    took = f" in {seconds:.1f} s" if seconds is not None else ""
    if trial.state.name == "COMPLETE":
        what = f"{metric} {trial.value:.4f}"
    elif trial.state.name == "PRUNED":
        step = trial.last_step
        value = trial.intermediate_values.get(step) if step is not None else None
        what = f"pruned at step {step}" + (f" ({metric} {value:.4f})" if value is not None else "")
    else:
        what = trial.state.name.lower()
    return f"trial {trial.number}: {what}{took}  [{params}]"


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else repr(v)


def tune(space: Space, train_data: Any, val_data: Any, *, n_trials: int = 20, steps: int = 200,
         eval_every: int | None = None, batch_size: int = 32, storage: Any = None, study_name: str | None = None,
         direction: str = "maximize", metric: str = "accuracy", evaluate: Evaluate | None = None,
         sampler: Any = "tpe", pruner: Any = "median", seed: int = 0, timeout: float | None = None,
         device: str | torch.device = "auto", num_workers: int = 0, callbacks: Sequence[Callable] = (),
         log: Callable[[str], None] | None = print) -> TuneResult:
    """Searches `space` until the study holds `n_trials` finished trials (see the module docstring on
    resuming) and returns the best (`TuneResult`).

    - `space(trial) -> Candidate | nn.Module`, e.g. `partial(classifier_space, num_classes=10, in_channels=1)`.
    - `steps` optimizer steps a trial, evaluated every `eval_every` (default: steps // 5) and at the end.
    - `storage`: None (in memory), a database URL (`sqlite:///runs/tune/study.db`) or an Optuna storage;
      `study_name` defaults to the space's function name, so rerunning the same call resumes it.
    - `direction` of `metric` ("maximize" for accuracy), computed by `evaluate` (default: top-1 accuracy).
    - `sampler`: "tpe" (multivariate TPE) or "random", seeded with `seed` plus the number of trials the study
      already holds (a resumed run does not replay the first run's draws), or an Optuna sampler;
      `pruner`: "median", "hyperband", "none" or an Optuna pruner.
    - `timeout` seconds: no trial starts after it. `callbacks(study, frozen_trial)` run after each trial,
      `log` (None for silence) gets one line a finished trial.
    """
    optuna = _optuna()
    _check_int("n_trials", n_trials, 1)
    _check_int("steps", steps, 1)
    _check_int("eval_every", eval_every, 1, allow_none=True)
    if direction not in ("maximize", "minimize"):
        raise ValueError(f"direction must be 'maximize' or 'minimize', got {direction!r}")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0):
        raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
    if study_name is not None and (not isinstance(study_name, str) or not study_name):
        raise ValueError(f"study_name must be a non-empty string or None, got {study_name!r}")
    if any(not callable(c) for c in callbacks):
        raise ValueError("callbacks must be callables (study, frozen_trial) -> None")
    if isinstance(sampler, str) and sampler not in SAMPLERS:
        make_sampler(sampler, seed)  # raises the ValueError
    eval_every = eval_every or default_eval_every(steps)
    objective = make_objective(space, train_data, val_data, steps=steps, eval_every=eval_every,
                               batch_size=batch_size, metric=metric, evaluate=evaluate, seed=seed, device=device,
                               num_workers=num_workers)
    pruner = make_pruner(pruner, steps, eval_every)
    study_name = study_name or space_name(space)
    study = optuna.create_study(storage=make_storage(storage), study_name=study_name, direction=direction,
                                pruner=pruner, load_if_exists=True)
    _check_resumable(study, direction, {
        "space": space_name(space), "steps": steps, "eval_every": eval_every, "batch_size": batch_size,
        "metric": metric, "train_size": len(train_data), "val_size": len(val_data), "seed": seed})
    study.sampler = make_sampler(sampler, seed + len(study.trials))
    done = len(finished_trials(study))
    if log is not None and done:
        log(f"study {study_name!r}: {done} finished trial(s) kept, {max(0, n_trials - done)} to run")

    def report(study: Any, trial: Any) -> None:
        if log is not None:
            log(describe_trial(trial, metric))

    if done < n_trials:
        states = tuple(getattr(optuna.trial.TrialState, s) for s in FINISHED)
        study.optimize(objective, n_trials=n_trials - done, timeout=timeout,
                       callbacks=[report, optuna.study.MaxTrialsCallback(n_trials, states=states), *callbacks])
    return result_of(study, space)


def _check_resumable(study: Any, direction: str, settings: dict[str, Any]) -> None:
    """Records `settings` on a new study; refuses to continue a study run with other settings."""
    if study.direction.name.lower() != direction:
        raise ValueError(f"study {study.study_name!r} exists with direction {study.direction.name.lower()!r}, "
                         f"not {direction!r}: pass another study_name")
    stored = study.user_attrs.get("settings")
    if stored is None:
        study.set_user_attr("settings", settings)
        return
    differ = {k: (stored.get(k), v) for k, v in settings.items() if stored.get(k) != v}
    if differ:
        what = ", ".join(f"{k}={old!r} (now {new!r})" for k, (old, new) in differ.items())
        raise ValueError(f"study {study.study_name!r} was run with {what}: its values are not comparable with "
                         f"this call's; pass the same settings to resume it, or another study_name")
