"""`FixedParams`: a trial stand-in that answers each `suggest_*` from given values, without Optuna.

A search space is a function of a trial (`space(trial) -> Candidate`). Run by the tuner, the trial is an
`optuna.trial.Trial`; replayed from a study's `best_params`, it may be `optuna.trial.FixedTrial(params)`;
and to build one configuration with nothing but cvzoo installed (a zoo builder), it is `FixedParams`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

_MISSING = object()


class FixedParams:
    """Answers `suggest_categorical / suggest_int / suggest_float` from `params`, else from `defaults`.

    A value in `params` must lie in what the space suggests (one of the choices; in [low, high] on the
    step), else a ValueError names the parameter; a default outside it falls back to the first choice or
    the nearest bound. `params` records the values handed out (as `optuna.trial.Trial.params`), and
    `unused()` the given names the space never asked for (typos, or parameters of a branch not taken).
    """

    def __init__(self, params: Mapping[str, Any] | None = None, defaults: Mapping[str, Any] | None = None) -> None:
        for name, value in (("params", params), ("defaults", defaults)):
            if value is not None and not isinstance(value, Mapping):
                raise ValueError(f"{name} must be a mapping of parameter name -> value or None, "
                                 f"got {type(value).__name__}")
        self.given = dict(params or {})
        self.defaults = dict(defaults or {})
        self.params: dict[str, Any] = {}
        self.number = -1  # not a trial of any study
        self.user_attrs: dict[str, Any] = {}

    def unused(self) -> list[str]:
        """The names in `params` that no `suggest_*` call asked for."""
        return [name for name in self.given if name not in self.params]

    def set_user_attr(self, key: str, value: Any) -> None:
        self.user_attrs[key] = value

    def _lookup(self, name: str) -> tuple[Any, bool]:
        """(value, whether the caller gave it); a ValueError when neither params nor defaults hold it."""
        if name in self.params:  # asked twice: the same answer, as Optuna gives
            return self.params[name], True
        if name in self.given:
            return self.given[name], True
        if name in self.defaults:
            return self.defaults[name], False
        raise ValueError(f"no value for parameter {name!r}: pass it in params (or defaults)")

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        choices = tuple(choices)
        if not choices:
            raise ValueError(f"parameter {name!r}: choices must not be empty")
        value, given = self._lookup(name)
        if value not in choices or type(value) is not type(choices[choices.index(value)]):
            if given:
                raise ValueError(f"parameter {name!r} must be one of {choices}, got {value!r}")
            value = choices[0]
        self.params[name] = value
        return value

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int:
        value, given = self._lookup(name)
        ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high \
            and (value - low) % step == 0
        if not ok:
            if given:
                on_step = f" on steps of {step} from {low}" if step != 1 else ""
                raise ValueError(f"parameter {name!r} must be an int in [{low}, {high}]{on_step}, got {value!r}")
            value = low if not isinstance(value, int | float) else min(max(int(value), low), high)
            value = low + (value - low) // step * step
        self.params[name] = value
        return value

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None,
                      log: bool = False) -> float:
        value, given = self._lookup(name)
        numeric = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        on_grid = step is None or math.isclose((value - low) / step, round((value - low) / step), abs_tol=1e-8) \
            if numeric else False
        if not (numeric and low <= value <= high and on_grid):
            if given:
                raise ValueError(f"parameter {name!r} must be a float in [{low}, {high}]"
                                 f"{f' on steps of {step}' if step else ''}, got {value!r}")
            value = min(max(float(value), low), high) if numeric else low
        self.params[name] = float(value)
        return float(value)
