"""`cvzoo train` for the tiny CLIP: caption strings in, zero-shot accuracy on unseen and seen class pairs out."""

from __future__ import annotations

import json

import pytest
import torch

from cvzoo.cli import main
from cvzoo.data import create_dataset
from cvzoo.experiment import check_pair, load_run
from cvzoo.zoo import create_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_caption_strings_train_like_tokens():
    torch.manual_seed(0)
    model = create_model("tiny_clip_resnet_micro").eval()
    images = torch.randn(2, 3, 32, 32)
    captions = ["a red circle", "a blue star"]
    from_strings = model.loss(images, captions)["loss"]
    assert torch.equal(from_strings, model.loss(images, model.tokenizer(captions))["loss"])
    with pytest.raises(ValueError, match="2 images"):
        model.loss(images, captions[:1])


def test_splits_for_zero_shot_evaluation():
    val = create_dataset("shapes-captions", split="val", num_images=40, image_size=16)
    assert val.info.task == "captions" and isinstance(val[0][1], str)
    splits = val.zero_shot_splits()
    held = {val.classnames[int(splits["held_out_pairs"][i][1])] for i in range(40)}
    seen = {val.classnames[int(splits["seen_pairs"][i][1])] for i in range(40)}
    assert held == {f"{c} {s}" for c, s in val.held_out} and not held & seen
    train = create_dataset("shapes-captions", split="train", num_images=40, image_size=16)
    assert not {train.describe(i)[2][2:] for i in range(40)} & held  # "a red square" -> "red square"


def test_train_reports_zero_shot_accuracy(tmp_path):
    assert check_pair("tiny_clip_resnet_micro", "shapes-captions") == ("zero_shot", "captions")
    out = tmp_path / "clip"
    assert main(["train", "-m", "tiny_clip_resnet_micro", "-d", "shapes-captions", "--steps", "2", "--batch-size",
                 "8", "--train-images", "16", "--val-images", "8", "--no-progress", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert {"loss", "zero_shot_accuracy_held_out_pairs", "zero_shot_accuracy_seen_pairs"} <= set(metrics)
    model, run = load_run(out)
    assert run["task"] == "zero_shot" and model.tokenizer is not None
