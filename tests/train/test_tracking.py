import csv
import json
import logging
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from cvzoo.train import tracking
from cvzoo.train.tracking import CSVTracker, JSONLTracker, MultiTracker, Tracker, create_tracker, to_scalars

STEPS = [
    ({"loss": 1.5, "lr": torch.tensor(0.1)}, 1),
    ({"loss": np.float32(0.25), "lr": 0.05}, 2),
    ({"loss": float("nan"), "val/mAP50": torch.tensor([0.3], dtype=torch.float64)}, 3),  # a new column
]
EXPECTED = [
    {"step": 1, "loss": 1.5, "lr": float(torch.tensor(0.1))},
    {"step": 2, "loss": 0.25, "lr": 0.05},
    {"step": 3, "loss": math.nan, "val/mAP50": 0.3},
]


def _same(a: dict, b: dict) -> bool:  # equal, NaN included
    return a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


def _log_all(tracker):
    with tracker:
        tracker.log_config({"lr": 0.1, "out": Path("/tmp/x"), "sizes": (1, 2)})
        for metrics, step in STEPS:
            tracker.log(metrics, step)


def test_csv_round_trip_with_growing_columns(tmp_path):
    path = tmp_path / "metrics.csv"
    _log_all(CSVTracker(path))
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["step", "loss", "lr", "val/mAP50"]
    back = [{k: (int(v) if k == "step" else float(v)) for k, v in row.items() if v != ""} for row in rows]
    assert len(back) == 3 and all(_same(b, e) for b, e in zip(back, EXPECTED)), back
    assert not (tmp_path / "metrics.csv.tmp").exists()


def test_csv_append_resumes_existing_file(tmp_path):
    path = tmp_path / "metrics.csv"
    with CSVTracker(path) as t:
        t.log({"loss": 1.0}, 1)
    with CSVTracker(path, append=True) as t:
        t.log({"loss": 0.5, "acc": 0.9}, 2)
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows == [{"step": "1", "loss": "1.0", "acc": ""}, {"step": "2", "loss": "0.5", "acc": "0.9"}]
    with CSVTracker(path) as t:  # without append the run starts a fresh file
        t.log({"loss": 2.0}, 1)
    assert path.read_text().splitlines() == ["step,loss", "1,2.0"]


def test_jsonl_round_trip_and_config(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _log_all(JSONLTracker(path))
    back = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(back) == 3 and all(_same(b, e) for b, e in zip(back, EXPECTED)), back
    config = json.loads((tmp_path / "metrics.config.json").read_text())
    assert config == {"lr": 0.1, "out": "/tmp/x", "sizes": [1, 2]}


def test_jsonl_lines_are_flushed_before_close(tmp_path):
    t = JSONLTracker(tmp_path / "m.jsonl")
    t.log({"loss": 1.0}, 7)
    assert json.loads((tmp_path / "m.jsonl").read_text()) == {"step": 7, "loss": 1.0}
    t.close()
    t.close()  # twice is harmless


def test_to_scalars_names_the_bad_key():
    scalars = to_scalars({"a": torch.tensor(2), "b": np.int64(3), "c": float("inf")})
    assert scalars == {"a": 2.0, "b": 3.0, "c": math.inf} and all(type(v) is float for v in scalars.values())
    with pytest.raises(ValueError, match="'feat'"):
        to_scalars({"feat": torch.zeros(3)})
    with pytest.raises(ValueError, match="'name'"):
        to_scalars({"name": "resnet"})
    with pytest.raises(ValueError, match="reserved"):
        to_scalars({"step": 1})


class Recorder(Tracker):
    def __init__(self):
        self.calls, self.closed = [], False

    def log(self, metrics, step):
        self.calls.append((step, dict(metrics)))

    def log_config(self, config):
        self.calls.append(("config", dict(config)))

    def close(self):
        self.closed = True


class Broken(Recorder):
    def __repr__(self):
        return "Broken()"

    def log(self, metrics, step):
        raise OSError("disk full")


def test_failing_tracker_is_disabled_with_one_warning(caplog):
    good, bad = Recorder(), Broken()
    multi = MultiTracker([bad, good])
    with caplog.at_level(logging.WARNING, logger="cvzoo.train.tracking"):
        multi.log_config({"a": 1})
        for step in range(3):
            multi.log({"loss": torch.tensor(float(step))}, step)
        multi.close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "Broken()" in warnings[0].getMessage() and "disk full" in warnings[0].getMessage()
    assert multi.disabled == [bad] and multi.active == [good]
    assert good.calls == [("config", {"a": 1}), (0, {"loss": 0.0}), (1, {"loss": 1.0}), (2, {"loss": 2.0})]
    assert good.closed and bad.closed  # the disabled tracker still gets to release its files


def test_bad_metric_value_is_dropped_not_fatal(caplog):
    good = Recorder()
    multi = MultiTracker([good])
    with caplog.at_level(logging.WARNING, logger="cvzoo.train.tracking"):
        multi.log({"loss": 1.0, "feat": torch.zeros(4)}, 1)
        multi.log({"loss": 2.0, "feat": torch.zeros(4)}, 2)
    assert good.calls == [(1, {"loss": 1.0}), (2, {"loss": 2.0})]
    assert multi.active == [good]
    assert sum("'feat'" in r.getMessage() for r in caplog.records) == 1


@pytest.fixture
def no_tensorboard(monkeypatch):
    monkeypatch.setattr(tracking, "tensorboard_available", lambda: False)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `from torch.utils.tensorboard ...` fails


def test_create_tracker_without_tensorboard(tmp_path, no_tensorboard):
    with create_tracker(tmp_path / "run", config={"epochs": 2}) as t:
        assert [type(x) for x in t.trackers] == [CSVTracker, JSONLTracker]
        t.log({"loss": 0.5}, 10)
    assert (tmp_path / "run" / "metrics.csv").read_text().splitlines() == ["step,loss", "10,0.5"]
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text()) == {"step": 10, "loss": 0.5}
    assert json.loads((tmp_path / "run" / "metrics.config.json").read_text()) == {"epochs": 2}


def test_forced_tensorboard_missing_names_the_package(tmp_path, no_tensorboard):
    with pytest.raises(ImportError, match="pip install tensorboard"):
        create_tracker(tmp_path, tensorboard=True)
    with pytest.raises(ValueError, match="tensorboard"):
        create_tracker(tmp_path, tensorboard="yes")


def test_tensorboard_tracker_writes_scalars(tmp_path, monkeypatch):
    written = []

    class FakeWriter:
        def __init__(self, log_dir):
            written.append(("dir", log_dir))

        def add_scalar(self, tag, value, global_step):
            written.append((tag, value, global_step))

        def add_text(self, tag, text):
            written.append((tag, text))

        def flush(self):
            pass

        def close(self):
            written.append("closed")

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    monkeypatch.setattr(tracking, "tensorboard_available", lambda: True)
    with create_tracker(tmp_path) as t:  # "auto" picks it up when installed
        assert isinstance(t.trackers[-1], tracking.TensorBoardTracker)
        t.log({"loss": torch.tensor(1.0), "val/mAP": 0.5}, 3)
    assert written == [("dir", str(tmp_path)), ("loss", 1.0, 3), ("val/mAP", 0.5, 3), "closed"]


def test_wandb_enabled_but_missing_warns_and_continues(tmp_path, monkeypatch, caplog, no_tensorboard):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with caplog.at_level(logging.WARNING, logger="cvzoo.train.tracking"), create_tracker(tmp_path, wandb=True) as t:
        assert [type(x) for x in t.trackers] == [CSVTracker, JSONLTracker]
        t.log({"loss": 1.0}, 1)
    assert any("pip install wandb" in r.getMessage() for r in caplog.records)


def test_wandb_tracker_with_fake_module(tmp_path, monkeypatch, no_tensorboard):
    events = []

    class Run:
        config = types.SimpleNamespace(update=lambda c, allow_val_change: events.append(("config", c)))

        def log(self, metrics, step):
            events.append(("log", metrics, step))

        def finish(self):
            events.append("finish")

    def init(**kwargs):
        events.append(("init", kwargs))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    with create_tracker(tmp_path, wandb=True, project="p", run_name="r", config={"a": 1}) as t:
        t.log({"loss": np.float64(0.5)}, 4)
    assert events == [
        ("init", {"project": "p", "name": "r", "config": {"a": 1}, "dir": str(tmp_path)}),
        ("config", {"a": 1}),
        ("log", {"loss": 0.5}, 4),
        "finish",
    ]
