import math
import sys

import pytest
from PIL import Image

from cvzoo.train.plots import group_metrics, load_history, plot_curves
from cvzoo.train.tracking import CSVTracker, JSONLTracker

pytest.importorskip("matplotlib")


def _history(n=40, every=10):
    hist = [{"step": s, "loss": 2 / (s + 1), "loss_cls": 1 / (s + 1), "lr": 1e-3 * (1 - s / n)} for s in range(n)]
    hist += [{"step": s, "val/mAP50": s / n, "val/loss": 1.5 / (s + 1)} for s in range(every, n, every)]
    return hist


def _png_size(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
        return im.size


def test_group_metrics():
    keys = ["loss", "loss_cls", "train/loss_box", "lr", "lr/backbone", "val/mAP50", "val/loss", "grad_norm"]
    assert group_metrics(keys) == [
        ("loss", ["loss", "loss_cls", "train/loss_box", "val/loss"]),
        ("lr", ["lr", "lr/backbone"]),
        ("val/mAP50", ["val/mAP50"]),
        ("grad_norm", ["grad_norm"]),
    ]


def test_png_of_expected_size(tmp_path):
    out = plot_curves(_history(), tmp_path / "sub" / "curves.png", title="run 1")
    assert out == tmp_path / "sub" / "curves.png"
    assert _png_size(out) == (1200, 300)  # 3 groups (loss, lr, val/mAP50): 3 x (4 in x 3 in) at 100 dpi
    out = plot_curves([*_history(), {"step": 0, "grad_norm": 3.0}], tmp_path / "b.png", ncols=2, dpi=50)
    assert _png_size(out) == (400, 300)  # 4 groups, 2 per row at 50 dpi


def test_gaps_and_nan_plot(tmp_path):
    hist = _history(n=100, every=25)
    hist[3]["loss"] = math.nan
    hist.append({"step": 99, "val/mAP50": float("inf")})
    hist.append({"step": 100, "note": "a string is not a curve"})
    assert _png_size(plot_curves(hist, tmp_path / "c.png")) == (1200, 300)


def test_from_metrics_files_next_to_them(tmp_path):
    with JSONLTracker(tmp_path / "metrics.jsonl") as j, CSVTracker(tmp_path / "metrics.csv") as c:
        for record in _history():
            step = record.pop("step")
            j.log(record, step)
            c.log(record, step)
    assert load_history(tmp_path / "metrics.csv") == load_history(tmp_path / "metrics.jsonl")
    assert plot_curves(tmp_path / "metrics.jsonl") == tmp_path / "metrics.png"
    assert _png_size(tmp_path / "metrics.png") == (1200, 300)
    assert plot_curves(str(tmp_path / "metrics.csv"), tmp_path / "fromcsv.png").exists()


def test_bad_history(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        plot_curves([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_curves([{"step": 1}], tmp_path / "x.png")
    with pytest.raises(ValueError, match="'step'"):
        plot_curves([{"loss": 1.0}], tmp_path / "x.png")
    with pytest.raises(ValueError, match="path"):
        plot_curves(_history())
    (tmp_path / "m.txt").write_text("")
    with pytest.raises(ValueError, match=r"\.jsonl"):
        plot_curves(tmp_path / "m.txt")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        plot_curves(tmp_path / "empty.jsonl")
    assert not (tmp_path / "x.png").exists()


def test_missing_matplotlib_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_curves(_history(), tmp_path / "x.png")
