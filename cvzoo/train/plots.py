"""Training curves as a PNG: one subplot per metric group, x = step.

Groups, in this order: every loss together (a name, or its last `/` part, starting with "loss", or a name ending in
"loss": `loss`, `loss_cls`, `train/loss_box`, `val/loss`), every learning rate together (`lr`, `lr/...`, `lr_...`),
then each other metric alone (`val/mAP50`, `grad_norm`, ...) in the order first seen. A metric logged only now and
then (evaluation every N steps) is drawn through the steps that have it, with markers when it has few points.

matplotlib is imported on first use and drawn through its Agg canvas, so no display and no global pyplot state.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["group_metrics", "load_history", "plot_curves"]

History = Sequence[Mapping[str, Any]]


def load_history(path: str | os.PathLike) -> list[dict[str, float]]:
    """Records of a `metrics.jsonl` (one JSON object a line) or a wide `metrics.csv` (empty cell = not logged)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        with path.open() as f:
            return [json.loads(line) for line in f if line.strip()]
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        return [{k: float(v) for k, v in row.items() if k is not None and v not in ("", None)} for row in rows]
    raise ValueError(f"history path must end in .jsonl or .csv, got {str(path)!r}")


def _is_loss(key: str) -> bool:
    return key.startswith("loss") or key.endswith("loss") or key.rsplit("/", 1)[-1].startswith("loss")


def _is_lr(key: str) -> bool:
    return key == "lr" or key.startswith(("lr/", "lr_"))


def group_metrics(keys: Sequence[str]) -> list[tuple[str, list[str]]]:
    """(subplot title, metric names) pairs: losses together, learning rates together, then one per other metric."""
    losses = [k for k in keys if _is_loss(k)]
    lrs = [k for k in keys if _is_lr(k) and k not in losses]
    groups = [("loss", losses)] if losses else []
    if lrs:
        groups.append(("lr", lrs))
    groups += [(k, [k]) for k in keys if k not in losses and k not in lrs]
    return groups


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _series(history: History) -> tuple[list[str], dict[str, tuple[list[float], list[float]]]]:
    """Metric names in first-seen order, and per metric the (steps, values) of the records that have it."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for i, record in enumerate(history):
        if not isinstance(record, Mapping) or "step" not in record:
            raise ValueError(f"history[{i}] must be a dict with a 'step' entry, got {record!r}")
        step = _as_float(record["step"])
        if step is None:
            raise ValueError(f"history[{i}]['step'] must be a number, got {record['step']!r}")
        for key, value in record.items():
            y = _as_float(value)
            if key == "step" or y is None:  # non-numeric entries (a run name, a note) are not curves
                continue
            xs, ys = series.setdefault(key, ([], []))
            xs.append(step)
            ys.append(y)
    return list(series), series


def plot_curves(
    history: History | str | os.PathLike,
    path: str | os.PathLike | None = None,
    *,
    title: str | None = None,
    ncols: int = 3,
    subplot_size: tuple[float, float] = (4.0, 3.0),
    dpi: int = 100,
) -> Path:
    """Draws `history` and saves it as a PNG at `path`; returns the path.

    `history` is a list of records like `{"step": 10, "loss": 1.2, "lr": 1e-3, "val/mAP50": 0.4}` or the path of a
    `metrics.jsonl` / `metrics.csv`; in the latter case `path` defaults to the same name with `.png` beside it.
    The image is `min(ncols, G) * subplot_size[0] * dpi` by `ceil(G / ncols) * subplot_size[1] * dpi` pixels for
    G metric groups.
    """
    if isinstance(history, (str, os.PathLike)):
        source = Path(history)
        history = load_history(source)
        if path is None:
            path = source.with_suffix(".png")
    if path is None:
        raise ValueError("path is required when history is a list of records (where should the PNG go?)")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    if len(history) == 0:
        raise ValueError("history is empty: nothing to plot")
    keys, series = _series(history)
    if not keys:
        raise ValueError("history has no metrics besides 'step': nothing to plot")

    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("plot_curves needs matplotlib; install it with: pip install matplotlib") from err

    groups = group_metrics(keys)
    cols = min(ncols, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig = Figure(figsize=(cols * subplot_size[0], rows * subplot_size[1]), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)  # attaches the Agg canvas: savefig renders without any GUI backend
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (name, members) in zip(axes, groups):
        for key in members:
            xs, ys = series[key]
            # NaN values leave a gap in the line; markers keep sparse (eval-only) curves visible.
            ax.plot(xs, ys, label=key, marker="o" if len(xs) <= 30 else None, markersize=3, linewidth=1.2)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if len(members) > 1:
            ax.legend(fontsize=8)
    for ax in axes[len(groups) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
