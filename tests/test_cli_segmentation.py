"""`cvzoo train / eval / predict` for semantic segmentation: the noop baseline on a VOC-format folder made
here, and a tiny segmenter on Shapes masks."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from cvzoo.cli import main
from cvzoo.data import Shapes
from cvzoo.visualize import save_image_png


def _voc_segmentation_folder(root, n: int = 4):
    """A VOC2012-layout folder: n 24 x 32 images, class 15 (person) on the left, background right, a void
    (255) boundary column; train and val lists."""
    base = root / "VOCdevkit" / "VOC2012"
    for sub in ("SegmentationClass", "JPEGImages", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        mask = np.zeros((24, 32), dtype=np.uint8)
        mask[:, :12] = 15
        mask[:, 12] = 255
        Image.fromarray(mask, mode="L").convert("P").save(base / "SegmentationClass" / f"img{i}.png")
        image = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
        Image.fromarray(image).save(base / "JPEGImages" / f"img{i}.jpg", format="PNG")
        names.append(f"img{i}")
    for split in ("train", "val"):
        (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


def test_noop_trains_on_a_voc_segmentation_folder(tmp_path, capsys):
    """`-m noop -d voc_segmentation`: the majority-class baseline of the dataset's task; it learns that
    background (19 of the 31 labelled columns) is the majority and predicts it everywhere."""
    root = _voc_segmentation_folder(tmp_path / "voc")
    out = tmp_path / "run"
    assert main(["train", "-m", "noop", "-d", "voc_segmentation", "--data-root", str(root), "--steps", "60",
                 "--batch-size", "2", "--lr", "0.1", "--out", str(out), "--no-progress"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["model"] == "noop_segmenter" and run["dataset"] == "voc-segmentation" and run["task"] == "segmentation"
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    # majority class everywhere: background predicted on all 31 labelled columns, true on 19 (12 are person,
    # the void column is left out): background IoU 19 / 31, person IoU 0, pixel accuracy 19 / 31
    assert abs(metrics["pixel_accuracy"] - 19 / 31) < 1e-4
    assert abs(metrics["IoU/background"] - 19 / 31) < 1e-4 and metrics["IoU/person"] == 0.0
    assert "mIoU" in capsys.readouterr().out


def test_train_eval_predict_a_tiny_segmenter_on_shapes(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "-m", "deeplabv3_resnet_tiny", "-d", "shapes_segmentation", "--steps", "3",
                 "--batch-size", "4", "--train-images", "8", "--val-images", "4", "--out", str(out),
                 "--no-progress"]) == 0
    assert (out / "predictions.png").is_file() and (out / "model.safetensors").is_file()
    assert main(["eval", "--run", str(out), "--images", "4"]) == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "IoU per class: background" in printed
    image = Shapes(split="val", task="segmentation", num_images=1)[0][0]
    image_path = save_image_png(image, tmp_path / "shape.png")
    assert main(["predict", str(image_path), "--run", str(out), "--out", str(tmp_path / "pred")]) == 0
    drawn = torch.from_numpy(np.asarray(Image.open(tmp_path / "pred" / "shape_pred.png")).copy())
    assert drawn.shape == (*image.shape[-2:], 3)
    assert "classes" in capsys.readouterr().out
