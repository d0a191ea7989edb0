"""cvzoo.detection.evaluate with stub models whose detections are known: perfect boxes give AP 1,
boxes at IoU 0.6 pass at 0.5 and fail at 0.75; training mode comes back; a missing torchmetrics
names the pip extra."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn
from torchvision.ops import box_iou

from cvzoo.detection import Detections, evaluate

pytest.importorskip("torchmetrics")
pytest.importorskip("pycocotools")

# two images, told apart by their pixel value; boxes are large (COCO "large" > 96^2 pixels)
TARGETS = {
    0: {"boxes": torch.tensor([[10.0, 10, 110, 110], [120, 20, 220, 140]]), "labels": torch.tensor([0, 1])},
    1: {"boxes": torch.tensor([[30.0, 50, 150, 170]]), "labels": torch.tensor([1])},
}
SHIFT = 25.0  # a 100-px-wide box shifted by 25 px: IoU 75 / 125 = 0.6


def _loader(batch_as_tensor: bool = True):
    images = torch.stack([torch.full((3, 240, 240), float(i)) for i in TARGETS])
    targets = [TARGETS[i] for i in TARGETS]
    return [(images if batch_as_tensor else list(images), targets)]


class StubDetector(nn.Module):
    """predict returns each image's ground truth (optionally shifted right) with score 1."""

    def __init__(self, shift: float = 0.0, extra: Detections | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))  # evaluate reads the device from the parameters
        self.shift = shift
        self.extra = extra
        self.modes: list[bool] = []
        self.kwargs: list[dict] = []

    def predict(self, images, **kwargs) -> list[Detections]:
        self.modes.append(self.training)
        self.kwargs.append(kwargs)
        out = []
        for img in images:
            t = TARGETS[int(img[0, 0, 0])]
            boxes = t["boxes"] + torch.tensor([self.shift, 0.0, self.shift, 0.0])
            det = Detections(boxes, torch.ones(len(boxes)), t["labels"])
            if self.extra is not None:
                det = Detections(*(torch.cat([a, b]) for a, b in zip(det[:3], self.extra[:3])))
            out.append(det)
        return out


def test_perfect_detections_give_map_one():
    result = evaluate(StubDetector(), _loader())
    for key in ("map", "map_50", "map_75", "map_large", "mar_100"):
        assert result[key] == pytest.approx(1.0), key
    assert result["per_class"] == {"0": pytest.approx(1.0), "1": pytest.approx(1.0)}
    assert result["map_small"] == -1.0  # no small objects at all


def test_list_of_images_and_class_names():
    result = evaluate(StubDetector(), _loader(batch_as_tensor=False), class_names=["cat", "dog"])
    assert result["map"] == pytest.approx(1.0)
    assert set(result["per_class"]) == {"cat", "dog"}


def test_shifted_boxes_pass_iou_half_but_not_three_quarters():
    shifted = TARGETS[0]["boxes"][:1] + torch.tensor([SHIFT, 0.0, SHIFT, 0.0])
    iou = float(box_iou(shifted, TARGETS[0]["boxes"][:1]))
    assert iou == pytest.approx(0.6)
    result = evaluate(StubDetector(shift=SHIFT), _loader())
    assert result["map_50"] == pytest.approx(1.0)
    assert result["map_75"] == pytest.approx(0.0)
    # COCO map averages IoU 0.50, 0.55, 0.60 (all matched: every IoU here is >= 0.6) of ten thresholds
    assert 0.0 < result["map"] < 1.0


def test_false_positive_of_a_class_without_ground_truth():
    extra = Detections(torch.tensor([[150.0, 150, 230, 230]]), torch.tensor([0.9]), torch.tensor([2]))
    result = evaluate(StubDetector(extra=extra), _loader())
    assert result["per_class"]["2"] == -1.0  # documented: -1 where a class has no ground truth
    assert result["per_class"]["0"] == pytest.approx(1.0)


@pytest.mark.parametrize("training", [True, False])
def test_training_flag_restored_and_eval_mode_during_predict(training):
    model = StubDetector()
    model.train(training)
    evaluate(model, _loader(), score_thresh=0.3)
    assert model.training is training
    assert model.modes == [False]
    assert model.kwargs == [{"score_thresh": 0.3}]


def test_training_flag_restored_when_predict_raises():
    class Broken(StubDetector):
        def predict(self, images, **kwargs):
            raise RuntimeError("boom")

    model = Broken().train()
    with pytest.raises(RuntimeError, match="boom"):
        evaluate(model, _loader())
    assert model.training


def test_missing_torchmetrics_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchmetrics", None)
    monkeypatch.setitem(sys.modules, "torchmetrics.detection", None)
    with pytest.raises(ImportError, match=r"cvzoo\[metrics\]"):
        evaluate(StubDetector(), _loader())
