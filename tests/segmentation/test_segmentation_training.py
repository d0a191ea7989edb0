"""A tiny segmenter learns Shapes masks: mIoU on held-out images, through the same path as `cvzoo train`."""

from __future__ import annotations

import pytest

from cvzoo.experiment import TrainSettings, train


@pytest.mark.slow
def test_unet_micro_reaches_miou_08_on_held_out_shapes(tmp_path):
    """unet_resnet_micro (0.39M parameters), 2,000 steps of batch 16 on 2,048 generated 128 px images: about
    110 s on 2 CPU cores. Recorded (`cvzoo train -m unet_resnet_micro -d shapes_segmentation --steps 2000
    --train-images 2048`): mIoU 0.887 on the 128 validation images, seed 0; the issue asks >= 0.8."""
    settings = TrainSettings(model="unet_resnet_micro", dataset="shapes_segmentation", steps=2000, train_images=2048,
                             out=str(tmp_path / "run"), progress=False, eval_every=2000)
    result = train(settings, log=lambda _: None)
    metrics = result["metrics"]
    assert metrics["mIoU"] >= 0.8, metrics
    assert metrics["pixel_accuracy"] > 0.95
