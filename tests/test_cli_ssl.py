"""`cvzoo train` for self-supervised methods: they train on a classification set without its labels and are
evaluated by the leave-one-out k-NN accuracy of their held-out features."""

from __future__ import annotations

import json

import pytest

from cvzoo.cli import main
from cvzoo.experiment import TrainSettings, load_run


@pytest.mark.parametrize("name", ["simclr_resnet_micro", "byol_resnet_micro"])
def test_train_by_name_reports_knn_accuracy(tmp_path, name):
    out = tmp_path / name
    assert main(["train", "-m", name, "-d", "digits", "--steps", "2", "--batch-size", "16", "--no-progress",
                 "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert 0.0 <= metrics["knn_accuracy"] <= 1.0 and "loss" in metrics
    model, run = load_run(out)
    assert run["task"] == "self_supervised" and run["settings"]["augment"] == "none"
    assert model.signature.in_channels == 1  # built for the dataset's grey images


def test_defaults_come_from_the_zoo_entry():
    settings = TrainSettings(model="simclr_resnet_micro", dataset="digits")
    assert settings.batch_size == 128 and settings.steps == 1000 and settings.augment == "none"
