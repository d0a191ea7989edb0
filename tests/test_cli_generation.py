"""`cvzoo train` for generative models: each trains on digits by name with its zoo training defaults, its
evaluation reports the loss terms, and a sample grid (or reconstructions) is written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cvzoo.cli import main
from cvzoo.experiment import TrainSettings, generation_grid, load_run
from cvzoo.zoo import list_models


@pytest.mark.parametrize("name,steps", [("noop_generator", 60), ("vae_digits", 3), ("cdcgan_digits", 3)])
def test_train_by_name_writes_samples_and_metrics(tmp_path, capsys, name, steps):
    out = tmp_path / name
    assert main(["train", "-m", name, "-d", "digits", "--steps", str(steps), "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "samples.png" in printed
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert "loss" in metrics and np.isfinite(metrics["loss"])
    with Image.open(out / "samples.png") as im:
        assert im.format == "PNG" and im.width > 16 * 4
    run = json.loads((out / "run.json").read_text())
    assert run["task"] == "generation" and run["settings"]["augment"] == "none"  # the zoo's training defaults
    model, _ = load_run(out)
    assert model.image_size == 16


def test_noop_generator_learns_the_mean_digit(tmp_path):
    """The per-class pixel Gaussian after training: its class means are the mean training digit of each class."""
    out = tmp_path / "noop"
    assert main(["train", "-m", "noop_generator", "-d", "digits", "--steps", "300", "--no-progress",
                 "--out", str(out)]) == 0
    model, _ = load_run(out)
    from cvzoo.data.digits import Digits

    data = Digits("train", image_size=16)
    images = torch.stack([data[i][0] for i in range(len(data))]) * 2 - 1
    labels = torch.stack([data[i][1] for i in range(len(data))])
    for c in (0, 7):
        torch.testing.assert_close(model.mean[c], images[labels == c].mean(0), atol=0.05, rtol=0)


def test_generation_grid_rows_are_classes_for_conditional_models():
    from cvzoo.generative import PixelGaussian

    model = PixelGaussian(image_size=4, num_classes=3)
    with torch.no_grad():
        model.mean.copy_(torch.tensor([-1.0, 0.0, 1.0]).view(3, 1, 1, 1))
        model.log_std.fill_(-20)
    images, per_row = generation_grid(model, dataset=None, count=12)
    assert per_row == 4 and images.shape == (12, 1, 4, 4)
    torch.testing.assert_close(images[:, 0, 0, 0], torch.tensor([0.0] * 4 + [0.5] * 4 + [1.0] * 4))


def test_generation_models_train_on_classification_sets_and_have_defaults():
    names = list_models("generation")
    assert {"vae_digits", "dcgan_digits", "ddpm_digits", "ncsn_digits", "noop_generator"} <= set(names)
    settings = TrainSettings(model="dcgan_digits", dataset="digits")
    assert settings.lr == 2e-4 and settings.weight_decay == 0.0 and settings.batch_size == 64
    assert TrainSettings(model="dcgan_digits", dataset="digits", lr=1e-3).lr == 1e-3  # the user's value wins
    assert TrainSettings(model="resnet_micro_classifier", dataset="digits").lr == 2e-3  # general default
    assert main(["train", "-m", "ddpm_digits", "-d", "shapes", "--steps", "1"]) == 2  # detection set: refused
