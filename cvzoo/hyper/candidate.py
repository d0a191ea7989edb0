"""What a search space returns for one trial: the constructed model, how to train it, and the code that builds it.

`BuilderCall` keeps a constructor call as data, so the model a trial trains and the Python source printed
for it come from one object and cannot disagree:

    call = BuilderCall(ImageClassifier, BuilderCall(ResNet, widths=(8, 16)), BuilderCall(ClassificationHead, 16, 10))
    model = call.build()        # ResNet, then ClassificationHead, then ImageClassifier
    print(call.source())        # ImageClassifier(ResNet(widths=(8, 16)), ClassificationHead(16, 10))
    print(call.imports())       # ('from cvzoo.backbones import ResNet', 'from cvzoo.classification import ...', ...)

`build()` constructs the arguments depth-first and left to right, the order in which Python evaluates the
printed source, so under the same `torch.manual_seed` both give the same initial weights.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

OPTIMIZERS = ("adamw", "sgd")


class BuilderCall:
    """A call `fn(*args, **kwargs)` kept as data; arguments may themselves be `BuilderCall`s (built first).

    Argument values must print as Python that rebuilds them: numbers, strings, bools, None, tuples and
    lists of them, NamedTuples (their type is imported, e.g. `FeatureInfo`) and nested `BuilderCall`s.
    """

    def __init__(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> None:
        if not callable(fn) or not hasattr(fn, "__qualname__") or "<" in fn.__qualname__:
            raise ValueError(f"fn must be a named, importable callable (a class or module-level function), "
                             f"got {fn!r}")
        self.fn, self.args, self.kwargs = fn, args, kwargs

    def build(self) -> Any:
        """Calls `fn`, building nested calls first (depth-first, left to right, as Python evaluates `source()`)."""
        args = [_build(a) for a in self.args]
        kwargs = {k: _build(v) for k, v in self.kwargs.items()}
        return self.fn(*args, **kwargs)

    def source(self) -> str:
        """The Python expression of the call, e.g. `ResNet(layers=(1, 1), widths=(8, 16))`."""
        parts = [_source(a) for a in self.args] + [f"{k}={_source(v)}" for k, v in self.kwargs.items()]
        return f"{self.fn.__qualname__}({', '.join(parts)})"

    def imports(self) -> tuple[str, ...]:
        """`from package import names` lines for everything `source()` names, one per package, sorted."""
        by_module: dict[str, set[str]] = {}
        for obj in _named_objects(self):
            by_module.setdefault(_public_module(obj), set()).add(obj.__qualname__)
        return tuple(f"from {m} import {', '.join(sorted(names))}" for m, names in sorted(by_module.items()))

    def code(self, target: str = "model") -> str:
        """Imports, a blank line, then `target = source()`: a snippet to paste."""
        return "\n".join(self.imports()) + f"\n\n{target} = {self.source()}\n"

    def __repr__(self) -> str:
        return f"BuilderCall({self.source()})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BuilderCall) and self.source() == other.source()

    def __hash__(self) -> int:
        return hash(self.source())


def _build(value: Any) -> Any:
    if isinstance(value, BuilderCall):
        return value.build()
    if isinstance(value, list):
        return [_build(v) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_build(v) for v in value)
    return value


def _source(value: Any) -> str:
    if isinstance(value, BuilderCall):
        return value.source()
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple: keyword form, type imported
        return f"{type(value).__qualname__}({', '.join(f'{k}={_source(v)}' for k, v in zip(value._fields, value))})"
    if isinstance(value, list):
        return f"[{', '.join(_source(v) for v in value)}]"
    if isinstance(value, tuple):
        return f"({_source(value[0])},)" if len(value) == 1 else f"({', '.join(_source(v) for v in value)})"
    if value is None or isinstance(value, bool | int | float | str):
        return repr(value)
    raise ValueError(f"a BuilderCall argument must print as Python (numbers, strings, tuples, lists, "
                     f"NamedTuples, BuilderCalls), got {type(value).__name__}: {value!r}")


def _named_objects(value: Any) -> list[Any]:
    """The classes and functions `_source(value)` names."""
    if isinstance(value, BuilderCall):
        found = [value.fn]
        for v in (*value.args, *value.kwargs.values()):
            found += _named_objects(v)
        return found
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return [type(value)] + [o for v in value for o in _named_objects(v)]
    if isinstance(value, list | tuple):
        return [o for v in value for o in _named_objects(v)]
    return []


def _public_module(obj: Any) -> str:
    """The package that exports `obj` (`cvzoo.backbones` for ResNet), else the module defining it."""
    module = obj.__module__
    parts = module.split(".")
    for i in range(2, len(parts)):  # the shortest public home below the top package (cvzoo.x, then cvzoo.x.y)
        candidate = ".".join(parts[:i])
        try:
            if getattr(importlib.import_module(candidate), obj.__qualname__, None) is obj:
                return candidate
        except ImportError:  # pragma: no cover - a parent package always imports
            continue
    return module


@dataclasses.dataclass(frozen=True)
class TrainChoice:
    """The training settings a trial chose: optimizer ("adamw" or "sgd" with Nesterov momentum 0.9), its
    peak learning rate and weight decay (on weights of 2 or more dimensions only), and the `cvzoo train`
    augmentation ("none", "flip", or a kornia preset "light" / "medium" / "heavy")."""

    optimizer: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 0.05
    augment: str = "flip"

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not (isinstance(self.lr, int | float) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.weight_decay, int | float) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.augment not in ("none", "flip", "light", "medium", "heavy"):
            raise ValueError(f"augment must be 'none', 'flip', 'light', 'medium' or 'heavy', got {self.augment!r}")

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The optimizer over `model`'s trainable parameters (no weight decay on biases and norm parameters)."""
        from cvzoo.train.trainer import default_optimizer

        if self.optimizer == "adamw":
            return default_optimizer(model, self.lr, self.weight_decay)
        decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.SGD([g for g in groups if g["params"]], lr=self.lr, momentum=0.9, nesterov=True)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One trial's configuration: the `model` to train, its `training` settings, and, when the space
    built it from a `BuilderCall`, the Python that rebuilds it (`builder_call`, `imports`, `code`) and the
    zoo builder call with the same architecture (`zoo_call`, e.g. `hyper_classifier(width=24, ...)`)."""

    model: nn.Module
    training: TrainChoice = TrainChoice()
    builder_call: str | None = None
    imports: tuple[str, ...] = ()
    zoo_call: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(self.model).__name__}")
        if not isinstance(self.training, TrainChoice):
            raise ValueError(f"training must be a TrainChoice, got {type(self.training).__name__}")

    @classmethod
    def from_call(cls, call: BuilderCall, training: TrainChoice = TrainChoice(),
                  zoo_call: BuilderCall | None = None) -> Candidate:
        """Builds `call` and keeps its source (the model and the printed code come from the same call)."""
        return cls(call.build(), training, call.source(), call.imports(),
                   zoo_call.source() if zoo_call is not None else None)

    @property
    def code(self) -> str | None:
        """Imports and `model = <builder_call>`, ready to paste; None without a builder call."""
        if self.builder_call is None:
            return None
        return "\n".join(self.imports) + f"\n\nmodel = {self.builder_call}\n"


def as_candidate(value: Any) -> Candidate:
    """A space's return value as a Candidate: a Candidate as it is, a bare nn.Module with default training."""
    if isinstance(value, Candidate):
        return value
    if isinstance(value, nn.Module):
        return Candidate(value)
    raise ValueError(f"a search space must return a Candidate or an nn.Module, got {type(value).__name__}")
