"""The experiment layer behind `cvzoo train/eval/predict`: which pairs train, one step of each, the run directory."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader

from cvzoo.cli import main
from cvzoo.data.registry import DATASETS
from cvzoo.experiment import (
    DATA_TASK,
    NO_NOOP_TASKS,
    TRAINABLE_TASKS,
    TrainSettings,
    build_dataset,
    check_pair,
    collate_for,
    episodic_loader,
    evaluate_task,
    load_run,
    make_batch_transform,
    model_kwargs,
    target_keys,
    train,
)
from cvzoo.train import Trainer
from cvzoo.zoo import MODELS, create_model

DATA_TASKS = {DATA_TASK.get(t, t) for t in TRAINABLE_TASKS}  # what the trainable tasks' datasets are
EMBEDDED = [name for name, e in DATASETS.items() if not e.needs_root and e.task in DATA_TASKS]
PAIRS = [(m, d) for d in EMBEDDED for m, e in MODELS.items() if DATA_TASK.get(e.task, e.task) == DATASETS[d].task]


def test_every_trainable_task_has_a_noop_baseline_and_an_embedded_dataset():
    for task in TRAINABLE_TASKS:
        assert task in NO_NOOP_TASKS or any(name.startswith("noop_") and e.task == task
                                            for name, e in MODELS.items()), task
        assert any(DATASETS[d].task == DATA_TASK.get(task, task) for d in EMBEDDED), task


@pytest.mark.parametrize(("model_name", "dataset_name"), PAIRS)
def test_one_training_step_of_every_compatible_pair(model_name, dataset_name):
    """The smoke matrix: every zoo model on every embedded dataset of its task takes a finite step that
    changes its weights."""
    task, _ = check_pair(model_name, dataset_name)
    # few-shot models train on episodes (k_shot + query images of each class): the default image count
    settings = TrainSettings(model=model_name, dataset=dataset_name, train_images=None if task == "few_shot" else 2)
    probe = build_dataset(dataset_name, "train", settings)
    torch.manual_seed(0)
    model = create_model(model_name, **model_kwargs(model_name, probe.info))
    data = build_dataset(dataset_name, "train", settings, model.signature.in_channels,
                         getattr(model, "image_size", None) if task == "generation" else None)
    if task == "few_shot":
        loader = episodic_loader(model, data, episodes=1)
    else:
        loader = DataLoader(torch.utils.data.Subset(data, [0, 1]), batch_size=2,
                            collate_fn=collate_for(task, target_keys(model)))
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(model, max_steps=1, lr=1e-2, warmup_steps=0, schedule="constant", progress=False,
                      device="cpu", strategy="single",
                      batch_transform=make_batch_transform(model, task, "flip", data.info.image_size,
                                                           data.info.keypoint_flip))
    trainer.fit(loader)
    losses = [r["train/loss"] for r in trainer.history if "train/loss" in r]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_an_incompatible_pair_lists_what_fits(capsys):
    with pytest.raises(ValueError, match="does not train on") as err:
        check_pair("resnet_micro_classifier", "shapes")
    message = str(err.value)
    assert "fcos_micro" in message and "noop_detector" in message  # detectors that fit Shapes
    assert "digits" in message and "shapes-classification" in message  # datasets that fit the classifier
    assert main(["train", "-m", "resnet_micro_classifier", "-d", "shapes", "--steps", "1"]) == 2
    assert "does not train on" in capsys.readouterr().err
    with pytest.raises(ValueError, match="features models are parts"):
        check_pair("resnet_micro_fpn", "shapes")
    with pytest.raises(ValueError, match="unknown dataset"):
        check_pair("fcos_micro", "shapez")


def test_train_settings_reject_bad_values():
    for kwargs in ({"batch_size": 0}, {"steps": 0}, {"lr": 0.0}, {"grad_accum": 0}, {"num_workers": -1}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            TrainSettings(**kwargs)
    with pytest.raises(ValueError, match="augment"):
        make_batch_transform(create_model("noop_detector"), "detection", "sideways", (64, 64))


def test_flip_augmentation_moves_boxes_with_the_image():
    model = create_model("noop_detector")
    transform = make_batch_transform(model, "detection", "flip", (8, 10))
    torch.manual_seed(3)
    images = torch.rand(16, 3, 8, 10)
    targets = [{"boxes": torch.tensor([[1.0, 2.0, 4.0, 6.0]]), "labels": torch.tensor([1])} for _ in range(16)]
    out, new_targets = transform(images, targets)
    raw = out * torch.tensor(model.signature.std)[:, None, None] + torch.tensor(model.signature.mean)[:, None, None]
    flipped = [not torch.allclose(raw[i], images[i], atol=1e-5) for i in range(16)]
    assert 0 < sum(flipped) < 16
    assert new_targets.boxes.shape == (16, 1, 4)  # one padded TargetBatch, validated outside the loss
    for i, f in enumerate(flipped):
        expected = torch.tensor([[10 - 4.0, 2.0, 10 - 1.0, 6.0]]) if f else targets[i]["boxes"]
        assert torch.equal(new_targets.boxes[i], expected)
        if f:
            torch.testing.assert_close(raw[i], images[i].flip(-1), atol=1e-5, rtol=0)


def test_short_run_writes_the_run_directory_and_eval_predict_read_it(tmp_path, capsys):
    out = tmp_path / "run"
    result = train(TrainSettings(model="noop_detector", steps=3, train_images=8, val_images=8, batch_size=4,
                                 progress=False, out=str(out)))
    for name in ("run.json", "model.safetensors", "metrics.csv", "metrics.jsonl", "metrics.json", "curves.png",
                 "predictions.png", "checkpoints/last.pt"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["steps"] == 3 and set(saved["metrics"]) >= {"mAP", "mAP50", "AP/circle"}
    assert result["metrics"]["mAP50"] == saved["metrics"]["mAP50"]
    model, run = load_run(out)
    assert run["model"] == "noop_detector" and run["classes"] == ["circle", "square", "triangle", "star"]
    # eval through the CLI gives the metrics the run wrote
    assert main(["eval", "--run", str(out), "--split", "val", "--images", "8"]) == 0
    printed = capsys.readouterr().out
    assert f"mAP50 {saved['metrics']['mAP50']:.4f}" in printed
    # predict draws on an image file
    from cvzoo.visualize import save_image_png

    image_path = save_image_png((build_dataset("shapes", "val")[0][0] * 255).byte(), tmp_path / "in.png")
    assert main(["predict", str(image_path), "--run", str(out), "--out", str(tmp_path / "pred")]) == 0
    assert (tmp_path / "pred" / "in_pred.png").is_file()
    assert main(["eval", "--run", str(tmp_path / "missing")]) == 2


def test_evaluate_task_against_closed_forms():
    """Accuracy and MAE of the noop baselines are those of their constant predictions."""
    clf = create_model("noop_classifier", num_classes=3)
    with torch.no_grad():
        clf.logits.copy_(torch.tensor([0.0, 2.0, 1.0]))  # always predicts class 1
    labels = torch.tensor([1, 0, 1, 2, 1, 1])
    loader = [(torch.rand(3, 3, 8, 8), labels[:3]), (torch.rand(3, 3, 8, 8), labels[3:])]
    assert evaluate_task(clf, loader, "classification")["accuracy"] == pytest.approx(4 / 6)
    reg = create_model("noop_regressor")
    with torch.no_grad():
        reg.value.fill_(0.5)
    values = torch.tensor([[0.1], [0.9], [0.5], [0.7]])
    r = evaluate_task(reg, [(torch.rand(4, 3, 8, 8), values)], "regression")
    assert r["MAE"] == pytest.approx((0.4 + 0.4 + 0.0 + 0.2) / 4)
    assert r["RMSE"] == pytest.approx(((0.16 + 0.16 + 0.04) / 4) ** 0.5)


@pytest.mark.slow
def test_the_main_job_reaches_map50_half_on_held_out_shapes(tmp_path):
    """The bare `cvzoo train` (its default settings) on CPU: mAP50 >= 0.5 on the held-out Shapes images."""
    result = train(TrainSettings(out=str(tmp_path / "main"), progress=False))
    assert result["metrics"]["mAP50"] >= 0.5, result["metrics"]
    assert (tmp_path / "main" / "predictions.png").is_file()


@pytest.mark.slow
def test_digits_classification_reaches_97_percent(tmp_path):
    """The default classifier recipe (`cvzoo train -m resnet_micro_classifier -d digits`) on the test split."""
    result = train(TrainSettings(model="resnet_micro_classifier", dataset="digits", out=str(tmp_path / "digits"),
                                 progress=False))
    assert result["metrics"]["accuracy"] >= 0.97, result["metrics"]


def test_explain_writes_overlays_from_a_run_and_from_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "cls"
    train(TrainSettings(model="resnet_micro_classifier", dataset="shapes-classification", steps=2, train_images=8,
                        val_images=8, batch_size=4, progress=False, out=str(out)))
    from cvzoo.visualize import save_image_png

    image = build_dataset("shapes-classification", "val")[0][0]
    image_path = save_image_png((image * 255).byte(), tmp_path / "in.png")
    expl = tmp_path / "expl"
    assert main(["explain", str(image_path), "--run", str(out), "--out", str(expl)]) == 0
    assert "gradcam at backbone.layer4" in capsys.readouterr().out
    from PIL import Image

    assert Image.open(expl / "in_gradcam.png").size == (128, 128)
    for checkpoint in (out / "model.safetensors", out / "checkpoints" / "last.pt"):
        assert main(["explain", str(image_path), "-m", "resnet_micro_classifier", "--checkpoint", str(checkpoint),
                     "--method", "layercam", "--layer", "backbone.layer2", "--target", "2",
                     "--out", str(expl)]) == 0
        assert (expl / "in_layercam.png").is_file()
    # the weights came from the checkpoint: the map equals LayerCAM on the run's own model
    import numpy as np

    from cvzoo.experiment import read_image
    from cvzoo.explain import ClassifierTarget, LayerCAM, overlay

    model, _ = load_run(out)
    image = read_image(image_path)  # what the command read: the PNG's 8-bit pixels
    with LayerCAM(model, target_layers=["backbone.layer2"]) as cam:
        expected = overlay(image, cam(model.signature.normalize(image[None]), [ClassifierTarget(2)])[0])
    got = torch.from_numpy(np.asarray(Image.open(expl / "in_layercam.png"))).permute(2, 0, 1)
    assert (got.int() - expected.int()).abs().max() <= 1
    assert main(["explain", str(image_path), "--checkpoint", str(out / "model.safetensors")]) == 2
    assert "needs -m" in capsys.readouterr().err
    assert main(["explain", str(image_path), "-m", "fcos_micro", "--checkpoint", str(out / "model.safetensors")]) == 2
    assert "belongs to a 'resnet_micro_classifier' run" in capsys.readouterr().err


def test_flip_moves_masks_and_swaps_left_right_keypoints():
    from cvzoo.experiment import _flip_detection

    w = 10
    images = torch.zeros(2, 3, 4, w)
    mask = torch.zeros(1, 4, w, dtype=torch.bool)
    mask[0, 1:3, 1:4] = True  # columns 1-3
    kp = torch.tensor([[[2.0, 1, 1], [4, 2, 1], [2, 3, 1], [1, 2, 1]]])  # top, right, bottom, left
    target = {"boxes": torch.tensor([[1.0, 1, 4, 3]]), "labels": torch.tensor([0]), "masks": mask, "keypoints": kp}
    flipped, kept = _flip_detection(images, [target, target], torch.tensor([True, False]), keypoint_flip=(0, 3, 2, 1))
    assert kept is target  # an image that is not flipped keeps its targets
    assert torch.equal(flipped["boxes"], torch.tensor([[6.0, 1, 9, 3]]))
    assert torch.equal(flipped["masks"][0, 1, 6:9], torch.ones(3, dtype=torch.bool)) and flipped["masks"].sum() == 6
    # x -> w - x, then right and left swap places: the new right point is the old left one, mirrored
    assert torch.equal(flipped["keypoints"], torch.tensor([[[8.0, 1, 1], [9, 2, 1], [8, 3, 1], [6, 2, 1]]]))
    with pytest.raises(ValueError, match="keypoint_flip"):
        _flip_detection(images, [target], torch.tensor([True]))
