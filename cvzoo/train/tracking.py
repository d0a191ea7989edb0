"""Experiment trackers: where a run's metrics and config go.

The experiment (the CLI) builds one tracker per run, usually with `create_tracker`, and hands it to the trainer,
which only calls `log(metrics, step)`, `log_config(config)` and `close()`. Every tracker takes the same calls:

- `CSVTracker`: one wide table, a row per `log` call and a column per metric, readable by `csv.DictReader`.
- `JSONLTracker`: one JSON object per `log` call, `{"step": 10, "loss": 1.2, ...}`, flushed at once.
- `TensorBoardTracker`: scalars through `torch.utils.tensorboard` (needs `pip install tensorboard`).
- `WandbTracker`: a Weights & Biases run (needs `pip install wandb`).
- `MultiTracker`: fans the calls out; a tracker that raises is warned about once and disabled, so tracking never
  stops training.

Values may be Python numbers, numpy scalars or one-element tensors; they are stored as floats. Non-finite values
are written as they are: `nan` / `inf` in CSV, the bare `NaN` / `Infinity` tokens in JSONL (read back by Python's
`json`, not by strict JSON parsers).
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import importlib.util
import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "CSVTracker",
    "JSONLTracker",
    "MultiTracker",
    "TensorBoardTracker",
    "Tracker",
    "WandbTracker",
    "create_tracker",
    "to_scalars",
]


def _to_float(key: str, value: Any) -> float:
    if hasattr(value, "numel") and hasattr(value, "item"):  # a torch tensor, without importing torch here
        if value.numel() != 1:
            raise ValueError(f"metric {key!r} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    elif hasattr(value, "item") and getattr(value, "size", 1) == 1:  # numpy scalar or one-element array
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"metric {key!r} must be a real number, got {value!r} ({type(value).__name__})")
    return float(value)


def to_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Metric values (numbers, numpy scalars, one-element tensors) as Python floats; NaN and inf pass through.

    Raises ValueError naming the key for a non-scalar value, a non-string key, or the reserved key "step".
    """
    out = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise ValueError(f"metric names must be strings, got {key!r} ({type(key).__name__})")
        if key == "step":
            raise ValueError("metric name 'step' is reserved: pass the step as the `step` argument of log()")
        out[key] = _to_float(key, value)
    return out


def _to_step(step: Any) -> int:
    if hasattr(step, "item"):
        step = step.item()
    if isinstance(step, bool) or not isinstance(step, int):
        raise ValueError(f"step must be an int, got {step!r} ({type(step).__name__})")
    return step


class Tracker:
    """Base of all trackers: `log` metrics at a step, `log_config` once, `close` at the end. A context manager."""

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        raise NotImplementedError

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Records the run's configuration; trackers with no place for it ignore it."""

    def close(self) -> None:
        """Flushes and releases files or connections; calling it twice is harmless."""

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CSVTracker(Tracker):
    """A wide CSV table: header `step,<metric>,...`, one row per `log` call, empty cells for metrics not logged then.

    Columns grow as new metric names appear (say validation metrics after the first evaluation): the file is then
    rewritten once with the wider header, through a temporary file and `os.replace`, so it is never left
    half-written. Rows are appended and flushed after every call. `append=True` keeps the rows of an existing file
    (resuming a run); otherwise the file starts empty.
    """

    def __init__(self, path: str | os.PathLike, *, append: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fieldnames: list[str] = ["step"]
        if append and self.path.exists() and self.path.stat().st_size > 0:
            with self.path.open(newline="") as f:
                header = next(csv.reader(f), [])
            self.fieldnames = ["step", *(name for name in header if name != "step")]
        else:
            self.path.write_text("")
        self._file = self.path.open("a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=self.fieldnames)
        self._has_header = self.path.stat().st_size > 0

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        if self._file is None:
            raise RuntimeError(f"CSVTracker({str(self.path)!r}) is closed")
        row = {"step": _to_step(step), **to_scalars(metrics)}
        new = [key for key in row if key not in self.fieldnames]
        if new or not self._has_header:
            self.fieldnames += new
            self._rewrite()
        self._writer.writerow(row)  # floats as repr(): exact round trip, nan/inf as "nan"/"inf"
        self._file.flush()

    def _rewrite(self) -> None:
        """Rewrites the file under the current (wider) header, atomically, and reopens it for appending."""
        self._file.close()
        with self.path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fieldnames, restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)
        self._file = self.path.open("a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=self.fieldnames, restval="")
        self._has_header = True

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __repr__(self) -> str:
        return f"CSVTracker({str(self.path)!r})"


def _config_json(config: Mapping[str, Any]) -> str:
    return json.dumps(dict(config), indent=2, sort_keys=True, default=str)  # paths, dtypes, ... as strings


class JSONLTracker(Tracker):
    """One JSON object per `log` call, `{"step": ..., "<metric>": ...}`, each line flushed when written.

    `log_config` writes the config beside the metrics, as `<stem>.config.json` (`metrics.config.json` for
    `metrics.jsonl`), so that every line of the metrics file has the same kind. `append=True` keeps an existing file.
    """

    def __init__(self, path: str | os.PathLike, *, append: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a" if append else "w")

    @property
    def config_path(self) -> Path:
        return self.path.with_name(self.path.stem + ".config.json")

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        if self._file is None:
            raise RuntimeError(f"JSONLTracker({str(self.path)!r}) is closed")
        self._file.write(json.dumps({"step": _to_step(step), **to_scalars(metrics)}) + "\n")
        self._file.flush()

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.config_path.write_text(_config_json(config) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __repr__(self) -> str:
        return f"JSONLTracker({str(self.path)!r})"


def tensorboard_available() -> bool:
    """Whether the `tensorboard` package is installed (what `create_tracker(tensorboard="auto")` asks)."""
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardTracker(Tracker):
    """Scalars to TensorBoard event files in `log_dir` (`tensorboard --logdir <log_dir>`); config as a text entry."""

    def __init__(self, log_dir: str | os.PathLike, **writer_kwargs: Any) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError(
                "TensorBoardTracker needs the 'tensorboard' package, which is not installed; "
                "install it with: pip install tensorboard"
            ) from err
        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(self.log_dir), **writer_kwargs)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        step = _to_step(step)
        for key, value in to_scalars(metrics).items():
            self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()

    def log_config(self, config: Mapping[str, Any]) -> None:
        # Markdown code block: TensorBoard's text tab renders it verbatim.
        self._writer.add_text("config", "```\n" + _config_json(config) + "\n```")

    def close(self) -> None:
        self._writer.close()

    def __repr__(self) -> str:
        return f"TensorBoardTracker({str(self.log_dir)!r})"


class WandbTracker(Tracker):
    """A Weights & Biases run: `wandb.init(project=..., name=run_name, config=..., **init_kwargs)`.

    W&B ignores steps lower than one already logged, so log with non-decreasing steps.
    """

    def __init__(
        self,
        project: str = "cvzoo",
        run_name: str | None = None,
        config: Mapping[str, Any] | None = None,
        *,
        dir: str | os.PathLike | None = None,  # wandb.init's own name for it
        **init_kwargs: Any,
    ) -> None:
        try:
            wandb = importlib.import_module("wandb")
        except ImportError as err:
            raise ImportError(
                "WandbTracker needs the 'wandb' package, which is not installed; install it with: pip install wandb"
            ) from err
        if dir is not None:
            init_kwargs["dir"] = str(dir)
        self.run = wandb.init(
            project=project, name=run_name, config=dict(config) if config is not None else None, **init_kwargs
        )

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        self.run.log(to_scalars(metrics), step=_to_step(step))

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.run.config.update(dict(config), allow_val_change=True)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None

    def __repr__(self) -> str:
        return "WandbTracker()"


class MultiTracker(Tracker):
    """Fans every call out to `trackers`; never raises into training.

    A tracker that raises is disabled after one `logging.warning` naming it and the exception; the others go on.
    Metric values that are not scalars are dropped (one warning per metric name) before any tracker sees them, so
    one bad value does not disable every tracker.
    """

    def __init__(self, trackers: Iterable[Tracker]) -> None:
        self.trackers = list(trackers)
        self.disabled: list[Tracker] = []
        self._bad_keys: set[str] = set()
        self._closed = False

    @property
    def active(self) -> list[Tracker]:
        return [t for t in self.trackers if not any(t is d for d in self.disabled)]

    def _call(self, method: str, *args: Any) -> None:
        for tracker in self.active:
            try:
                getattr(tracker, method)(*args)
            except Exception as err:  # tracking must not stop training
                logger.warning(
                    "tracker %r failed in %s() and is disabled for the rest of the run: %r", tracker, method, err
                )
                self.disabled.append(tracker)

    def _clean(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        clean = {}
        for key, value in metrics.items():
            try:
                clean.update(to_scalars({key: value}))
            except ValueError as err:
                if str(key) not in self._bad_keys:
                    self._bad_keys.add(str(key))
                    logger.warning("metric %r is not logged: %s", key, err)
        return clean

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        try:
            step = _to_step(step)
        except ValueError as err:
            logger.warning("metrics at step %r are not logged: %s", step, err)
            return
        self._call("log", self._clean(metrics), step)

    def log_config(self, config: Mapping[str, Any]) -> None:
        self._call("log_config", config)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        failed_before = list(self.disabled)
        self._call("close")
        for tracker in failed_before:  # release their files too, quietly: they were warned about already
            with contextlib.suppress(Exception):
                tracker.close()

    def __repr__(self) -> str:
        return f"MultiTracker({self.trackers!r})"


def create_tracker(
    out_dir: str | os.PathLike,
    *,
    tensorboard: bool | str = "auto",
    wandb: bool = False,
    project: str = "cvzoo",
    run_name: str | None = None,
    config: Mapping[str, Any] | None = None,
    resume: bool = False,
) -> MultiTracker:
    """The trackers of one run in `out_dir`: `metrics.csv` and `metrics.jsonl` always, plus

    - TensorBoard (event files in `out_dir`): `tensorboard="auto"` when the package is installed, `True` always
      (ImportError naming the package when it is missing), `False` never;
    - W&B when `wandb=True` and the package is installed; enabled but missing or failing to start gives a warning
      and the run goes on without it.

    `config`, when given, is logged to every tracker. `resume=True` appends to existing metric files.
    """
    if tensorboard not in ("auto", True, False):
        raise ValueError(f"tensorboard must be 'auto', True or False, got {tensorboard!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trackers: list[Tracker] = [
        CSVTracker(out / "metrics.csv", append=resume),
        JSONLTracker(out / "metrics.jsonl", append=resume),
    ]
    if tensorboard is True:
        try:
            trackers.append(TensorBoardTracker(out))
        except ImportError:
            MultiTracker(trackers).close()  # release the files already opened before re-raising
            raise
    elif tensorboard == "auto" and tensorboard_available():
        try:
            trackers.append(TensorBoardTracker(out))
        except ImportError as err:  # installed but broken: "auto" means best effort
            logger.warning("TensorBoard logging is off: %s", err)
    if wandb:
        try:
            trackers.append(WandbTracker(project, run_name, config, dir=out))
        except Exception as err:  # missing package, no login, no network: the run goes on
            logger.warning("W&B logging is off: %s", err)
    tracker = MultiTracker(trackers)
    if config is not None:
        tracker.log_config(config)
    return tracker
