"""`cvzoo tune` in-process: prints each trial and the best builder call, writes best.json, resumes its study."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from cvzoo.hyper.cli import add_parsers

optuna = pytest.importorskip("optuna")
pytest.importorskip("sklearn")  # the digits dataset
pytestmark = pytest.mark.usefixtures("one_thread")


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="cvzoo")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["tune", *argv])
    return args.func(args)


def test_tune_digits_prints_the_best_builder_call_and_resumes(tmp_path, capsys):
    out = tmp_path / "tune"
    tiny = ["-m", "hyper_classifier", "-d", "digits", "--steps", "4", "--batch-size", "16", "--train-images", "64",
            "--val-images", "32", "--sampler", "random", "--pruner", "none", "--device", "cpu", "--out", str(out)]
    assert _run(*tiny, "--trials", "2") == 0
    text = capsys.readouterr().out
    assert text.count("  trial ") == 2 and "best: trial" in text
    assert "builder call:" in text and "model = ImageClassifier(" in text and "zoo builder: hyper_classifier(" in text
    best = json.loads((out / "best.json").read_text())
    assert best["study_name"] == "hyper_classifier-digits" and best["trials"] == {"complete": 2}
    storage = f"sqlite:///{out / 'study.db'}"
    first = [(t.params, t.value) for t in optuna.load_study(study_name="hyper_classifier-digits",
                                                            storage=storage).trials]

    assert _run(*tiny, "--trials", "3") == 0  # resumes: one more trial
    assert "2 finished trial(s) kept, 1 to run" in capsys.readouterr().out
    study = optuna.load_study(study_name="hyper_classifier-digits", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    assert [(t.params, t.value) for t in study.trials[:2]] == first
    best = json.loads((out / "best.json").read_text())
    assert best["best_value"] == study.best_value and best["best_params"] == study.best_params

    namespace: dict = {}  # the printed code builds a digits classifier (grey images, ten classes)
    exec("\n".join(best["imports"]) + f"\nmodel = {best['builder_call']}", namespace)
    assert namespace["model"](torch.rand(2, 1, 32, 32)).logits.shape == (2, 10)


@pytest.mark.parametrize("argv, match", [
    (["-m", "hyper_detector"], "unknown search space 'hyper_detector' .* known spaces: hyper_classifier"),
    (["-d", "nope"], "unknown dataset 'nope' .* known datasets:"),
    (["-d", "shapes"], "tunes classifiers; dataset 'shapes' is a detection set"),
    (["--trials", "0"], "--trials must be a positive integer, got 0"),
])
def test_bad_arguments(argv, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        _run(*argv, "--out", str(tmp_path))
