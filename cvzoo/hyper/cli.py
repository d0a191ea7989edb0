"""`cvzoo tune`: search a named space on a registered dataset, resumably, and print the best builder call.

    cvzoo tune -m hyper_classifier -d digits --trials 20 --steps 200

writes runs/tune-hyper_classifier-digits/study.db (the Optuna study: rerun the command to resume it, or
raise --trials to add trials) and best.json (best value, parameters, builder call). `add_parsers(sub)`
adds the subcommand to an argparse subparsers object; `cvzoo/cli.py` calls it.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cvzoo.hyper.space import classifier_space
from cvzoo.hyper.tuner import PRUNERS, SAMPLERS


def _classifier(info: Any) -> Callable:
    if info.task != "classification":
        from cvzoo.data.registry import list_datasets

        raise ValueError(f"space 'hyper_classifier' tunes classifiers; dataset {info.name!r} is a {info.task} set. "
                         f"Classification datasets: {', '.join(list_datasets('classification'))}")
    return functools.partial(classifier_space, num_classes=len(info.classes), in_channels=info.in_channels)


# name -> (dataset info -> space): the spaces `cvzoo tune -m NAME` knows, named as their zoo builders
SPACES: dict[str, Callable[[Any], Callable]] = {"hyper_classifier": _classifier}


def check_space_name(name: str) -> None:
    if name not in SPACES:
        raise ValueError(f"unknown search space {name!r} for -m/--model; known spaces: {', '.join(SPACES)}")


def get_space(name: str, info: Any) -> Callable:
    """The search space `name` fitted to a dataset's `info` (classes, channels)."""
    check_space_name(name)
    return SPACES[name](info)


def _subset(dataset: Any, count: int | None) -> Any:
    from torch.utils.data import Subset

    return dataset if count is None or count >= len(dataset) else Subset(dataset, range(count))


def _positive(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def cmd_tune(args: argparse.Namespace) -> int:
    """Runs `cvzoo tune`; returns the exit code (0, or 1 when no trial completed)."""
    from cvzoo.data.registry import DATASETS
    from cvzoo.experiment import build_dataset, held_out_split, resolve_dataset_name
    from cvzoo.hyper.tuner import _optuna, tune

    dataset = resolve_dataset_name(args.dataset)
    check_space_name(args.model)  # before any data is read
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {args.dataset!r} for -d/--dataset; known datasets: {', '.join(DATASETS)}")
    for name in ("trials", "steps", "batch_size"):
        _positive(f"--{name.replace('_', '-')}", getattr(args, name))
    for name in ("eval_every", "train_images", "val_images"):
        _positive(f"--{name.replace('_', '-')}", getattr(args, name), allow_none=True)
    out = Path(args.out) if args.out else Path("runs") / f"tune-{args.model}-{dataset}"
    storage = args.storage or f"sqlite:///{out / 'study.db'}"
    study_name = args.study_name or f"{args.model}-{dataset}"

    train_set = build_dataset(dataset, "train")
    space = get_space(args.model, train_set.info)
    val_set = build_dataset(dataset, held_out_split(dataset))
    train_set, val_set = _subset(train_set, args.train_images), _subset(val_set, args.val_images)
    print(f"cvzoo tune: {args.model} on {dataset} ({len(train_set)} train / {len(val_set)} val images), "
          f"{args.trials} trials of {args.steps} steps; study {study_name!r} in {storage}")
    optuna = _optuna()
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line a trial is printed here instead
    started = time.perf_counter()
    try:
        result = tune(space, train_set, val_set, n_trials=args.trials, steps=args.steps, eval_every=args.eval_every,
                      batch_size=args.batch_size, storage=storage, study_name=study_name, sampler=args.sampler,
                      pruner=args.pruner, seed=args.seed, timeout=args.timeout, device=args.device,
                      num_workers=args.workers, log=lambda line: print(f"  {line}", flush=True))
    except RuntimeError as err:  # no complete trial (all pruned or failed)
        print(f"cvzoo tune: {err}")
        return 1
    finally:
        optuna.logging.set_verbosity(verbosity)
    seconds = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    record = {**result.to_dict(), "model": args.model, "dataset": dataset, "storage": storage, "seconds": seconds}
    (out / "best.json").write_text(json.dumps(record, indent=2))
    counts = ", ".join(f"{n} {state}" for state, n in sorted(result.counts.items()))
    print(f"\nstudy {study_name!r}: {counts} trial(s); {seconds:.1f} s")
    print(f"best: trial {result.best_trial}, accuracy {result.best_value:.4f}")
    print("params: " + json.dumps(result.best_params))
    if result.code:
        print("builder call:\n" + "\n".join(f"    {line}".rstrip() for line in result.code.strip().splitlines()))
    if result.zoo_call:
        print(f"zoo builder: {result.zoo_call}")
    print(f"written: {out / 'best.json'}")
    return 0


def add_parsers(subparsers: Any) -> argparse.ArgumentParser:
    """Adds `tune` to an argparse subparsers object; returns its parser (handler in `func`)."""
    p = subparsers.add_parser("tune", help="hyperparameter search (Optuna, cvzoo[hyper]) of a search space on a "
                                           "dataset; resumable")
    p.add_argument("-m", "--model", default="hyper_classifier",
                   help=f"search space (default hyper_classifier; known: {', '.join(SPACES)})")
    p.add_argument("-d", "--dataset", default="digits", help="classification dataset (default digits)")
    p.add_argument("--trials", type=int, default=20,
                   help="finished trials the study should hold (a rerun resumes up to it; default 20)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps a trial (default 200)")
    p.add_argument("--eval-every", type=int, default=None, help="evaluate and maybe prune every N steps "
                                                                "(default steps // 5)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--train-images", type=int, default=None, help="train on the first N training images only")
    p.add_argument("--val-images", type=int, default=None, help="validate on the first N held-out images only")
    p.add_argument("--storage", default=None, help="database URL (default sqlite:///OUT/study.db)")
    p.add_argument("--study-name", default=None, help="default MODEL-DATASET")
    p.add_argument("--sampler", choices=SAMPLERS, default="tpe")
    p.add_argument("--pruner", choices=PRUNERS, default="median")
    p.add_argument("--timeout", type=float, default=None, help="seconds after which no trial starts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--out", default=None, help="folder of study.db and best.json (default runs/tune-MODEL-DATASET)")
    p.set_defaults(func=cmd_tune)
    return p
