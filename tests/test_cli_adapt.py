"""`cvzoo train` for few-shot learners (episodes of the base classes, scored on the held-out classes) and
debiasing models (coloured digits, scored on label accuracy and the adversary's colour accuracy)."""

from __future__ import annotations

import json

import pytest

from cvzoo.cli import main
from cvzoo.experiment import check_pair, load_run

pytestmark = pytest.mark.usefixtures("one_thread")


def test_few_shot_training_reports_held_out_class_accuracy(tmp_path):
    out = tmp_path / "protonet"
    assert main(["train", "-m", "protonet_resnet_micro", "-d", "digits", "--steps", "3", "--no-progress",
                 "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert set(metrics) == {"5way_1shot_accuracy", "5way_1shot_ci95", "5way_5shot_accuracy", "5way_5shot_ci95"}
    assert 0.2 < metrics["5way_5shot_accuracy"] <= 1.0  # above chance even from 3 steps: features of any CNN
    model, run = load_run(out)
    assert run["task"] == "few_shot" and model.signature.in_channels == 1


def test_debiasing_training_reports_label_and_adversary_accuracy(tmp_path):
    out = tmp_path / "dann"
    assert main(["train", "-m", "dann_resnet_micro", "-d", "coloured-digits", "--steps", "3", "--batch-size", "16",
                 "--no-progress", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert set(metrics) == {"accuracy", "adversary_accuracy"}
    model, _ = load_run(out)
    assert model.adversary_target == "colour" and int(model.reversal.step) == 3


def test_pairs_are_checked():
    assert check_pair("protonet_resnet_micro", "digits") == ("few_shot", "classification")
    assert check_pair("erm_resnet_micro", "coloured-digits") == ("debiasing", "debiasing")
    with pytest.raises(ValueError, match="does not train on dataset"):
        check_pair("dann_resnet_micro", "digits")
