"""cvzoo.explain.targets: what each target reads from classifier, regressor, multi-task and detector outputs.

(Named test_cam_targets.py: tests/classification/test_targets.py already holds the basename.)
Values are checked against the outputs read directly (logits, regression heads, dense_predictions with
torchvision's box_iou), choices against `predict`, and CAMs with a target against CAMs with the same
scalar written as a plain function.
"""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_iou

from cvzoo import zoo
from cvzoo.explain import (
    BoxScoreTarget,
    CAMTarget,
    ClassifierTarget,
    DetectionTarget,
    DetectorOutput,
    GradCAM,
    RegressionTarget,
    ScoreCAM,
)
from cvzoo.heads import ClassificationOutput, KeypointOutput, RegressionOutput

DETECTORS = ["retinanet_micro", "fcos_micro", "atss_micro", "centernet_micro"]
THRESH = 0.001  # random heads score ~0.01: below the models' default 0.05


def _images(b: int = 2, h: int = 64, w: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _model(name: str, **kwargs):
    torch.manual_seed(0)
    return zoo.create_model(name, **kwargs).eval()


@pytest.fixture(scope="module")
def retinanet():
    return _model("retinanet_micro", num_classes=4, score_thresh=THRESH)


# ---- classification -------------------------------------------------------------------------------------


def test_classifier_target_finds_the_logits():
    logits = torch.randn(3, 5)
    for output in (logits, ClassificationOutput(logits), {"logits": logits}, {"label": ClassificationOutput(logits)}):
        assert ClassifierTarget(4)(output, 1) == logits[1, 4]
    assert ClassifierTarget(2, key="label")({"label": ClassificationOutput(logits), "other": 0}, 2) == logits[2, 2]
    top = ClassifierTarget().resolve(logits, 0)
    assert top.class_index == int(logits[0].argmax())
    assert ClassifierTarget()(logits, 0) == logits[0].max()


def test_classifier_target_rejects_bad_input():
    logits = torch.randn(3, 5)
    with pytest.raises(ValueError, match="class_index=5 is out of range for 5 classes"):
        ClassifierTarget(5)(logits, 0)
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="class_index must be a non-negative int or None"):
            ClassifierTarget(bad)
    with pytest.raises(ValueError, match="key='probs' is not in the model's output"):
        ClassifierTarget(0, key="probs")({"logits": logits}, 0)
    with pytest.raises(ValueError, match="cannot tell which entry"):
        ClassifierTarget(0)({"a": ClassificationOutput(logits), "b": ClassificationOutput(logits)}, 0)
    with pytest.raises(ValueError, match=r"needs \(B, num_classes\) logits.*RegressionOutput"):
        ClassifierTarget(0)(RegressionOutput(logits), 0)


def test_image_classifier_default_target_is_predicts_label():
    model = _model("resnet_micro_classifier", num_classes=6)
    images = _images(3, 32, 32)
    cam = GradCAM(model, target_layers=["backbone.layer4"])
    labels = model.predict(images).labels.tolist()
    assert torch.equal(cam(images), cam(images, [ClassifierTarget(c) for c in labels]))
    assert torch.equal(cam(images, ClassifierTarget(5)), cam(images, lambda out, i: out.logits[i, 5]))


# ---- regression ------------------------------------------------------------------------------------------


def test_regression_target_reads_values_and_keypoints():
    values, points = torch.randn(2, 3), torch.rand(2, 4, 2)
    assert RegressionTarget(2)(RegressionOutput(values), 1) == values[1, 2]
    assert RegressionTarget(1)(values, 0) == values[0, 1]
    out = {"value": RegressionOutput(values), "keypoints": KeypointOutput(points)}
    assert RegressionTarget(0, key="value")(out, 1) == values[1, 0]
    assert RegressionTarget(5, key="keypoints")(out, 0) == points[0, 2, 1]  # 2k + 1: y of point k = 2
    with pytest.raises(ValueError, match="output_index=8 is out of range for 8 values"):
        RegressionTarget(8, key="keypoints")(out, 0)
    with pytest.raises(ValueError, match=r"pass key=\.\.\. for a dict output"):
        RegressionTarget(0)(out, 0)
    with pytest.raises(ValueError, match="output_index must be a non-negative int"):
        RegressionTarget(None)


def test_multitask_value_head_explained():
    model = _model("resnet_micro_multitask")
    images = _images(2, 32, 32)
    cam = GradCAM(model, target_layers=["backbone.layer3"])
    got = cam(images, RegressionTarget(key="value"))
    assert torch.equal(got, cam(images, lambda out, i: out["value"].values[i, 0]))
    assert not torch.equal(got, cam(images, ClassifierTarget(0, key="label")))  # a different head, another map
    regressor = _model("resnet_micro_regressor")
    cam = GradCAM(regressor, target_layers=["backbone.layer4"])
    assert torch.equal(cam(images, RegressionTarget()), cam(images, lambda out, i: out.values[i, 0]))


# ---- detection -------------------------------------------------------------------------------------------


def test_detection_target_sums_the_scores_of_overlapping_priors(retinanet):
    images = _images()
    target = DetectionTarget()
    output = target.model_output(retinanet, images)
    assert isinstance(output, DetectorOutput)
    scores, boxes = retinanet.dense_predictions(images)
    detections = retinanet.predict(images)
    for i in range(2):
        box, label = detections[i].boxes[0], int(detections[i].labels[0])
        overlap = box_iou(box[None], boxes[i])[0] > 0.5
        assert overlap.sum() >= 1
        expected = scores[i, overlap, label].sum()
        assert torch.allclose(target(output, i), expected, rtol=1e-6)
        resolved = target.resolve(output, i)
        assert isinstance(resolved, BoxScoreTarget)
        assert torch.equal(resolved.box, box) and resolved.label == label


def test_detection_target_explains_a_two_stage_detection():
    """Faster R-CNN's priors are its top raw proposals: the target sums the class scores of those overlapping
    the detection, and Grad-CAM gives a finite, non-trivial map."""
    model = _model("fasterrcnn_micro", num_classes=4)
    with torch.no_grad():  # the box head's default init gives near-uniform scores: vary them
        for p in model.box_branch.head.parameters():
            p.normal_(0, 0.05)
    images = _images(1)
    target = DetectionTarget(score_thresh=0.0)
    output = target.model_output(model, images)
    scores, boxes = model.dense_predictions(images)
    det = model.predict(images, score_thresh=0.0)[0]
    box, label = det.boxes[0], int(det.labels[0])
    overlap = box_iou(box[None], boxes[0])[0] > 0.5
    assert overlap.sum() >= 1
    assert torch.allclose(target(output, 0), scores[0, overlap, label].sum(), rtol=1e-6)
    maps = GradCAM(model, target_layers=["backbone.layer3"])(images, target)
    assert maps.shape == (1, *images.shape[-2:]) and torch.isfinite(maps).all() and maps.max() > 0


def test_detection_target_picks_by_index_label_or_reference_box(retinanet):
    images = _images()
    output = DetectionTarget().model_output(retinanet, images)
    det = output.detections[1]
    assert torch.equal(DetectionTarget(box_index=3).resolve(output, 1).box, det.boxes[3])
    label = int(det.labels[2])
    first_of_label = int((det.labels == label).nonzero()[0, 0])
    assert torch.equal(DetectionTarget(label=label).resolve(output, 1).box, det.boxes[first_of_label])
    second_of_label = int((det.labels == label).nonzero()[1, 0])
    assert torch.equal(DetectionTarget(box_index=1, label=label).resolve(output, 1).box, det.boxes[second_of_label])
    k = int((det.labels == label).nonzero()[-1, 0])
    ref = det.boxes[k] + torch.tensor([0.5, -0.5, 0.5, 0.5])
    candidates = (det.labels == label).nonzero()[:, 0]
    best = int(candidates[box_iou(ref[None], det.boxes[candidates])[0].argmax()])
    chosen = DetectionTarget(label=label, reference_box=ref.tolist()).resolve(output, 1)
    assert torch.equal(chosen.box, det.boxes[best]) and chosen.label == label


def test_detection_target_rejects_bad_input(retinanet):
    images = _images()
    output = DetectionTarget().model_output(retinanet, images)
    n = output.detections[0].boxes.shape[0]
    with pytest.raises(ValueError, match=f"box_index=999 but image 0 has {n} detections"):
        DetectionTarget(box_index=999).resolve(output, 0)
    with pytest.raises(ValueError, match="image 0 has no detections"):
        GradCAM(retinanet, target_layers=["backbone.layer3"])(images, DetectionTarget(score_thresh=0.9))
    with pytest.raises(ValueError, match="pass box_index or reference_box, not both"):
        DetectionTarget(box_index=0, reference_box=[0, 0, 5, 5])
    with pytest.raises(ValueError, match="reference_box must be 4 finite numbers"):
        DetectionTarget(reference_box=[5, 0, 1, 5])
    with pytest.raises(ValueError, match="iou_threshold must lie in"):
        DetectionTarget(iou_threshold=1.5)
    with pytest.raises(ValueError, match="score_thresh must lie in"):
        DetectionTarget(score_thresh=2)
    with pytest.raises(ValueError, match="label=7 is out of range for 4 classes"):
        BoxScoreTarget([0, 0, 5, 5], 7)(output, 0)
    classifier = _model("resnet_micro_classifier", num_classes=3)
    with pytest.raises(ValueError, match="targets: a detection target needs a model with dense_predictions"):
        GradCAM(classifier, target_layers=["backbone.layer4"])(_images(2, 32, 32), DetectionTarget())
    with pytest.raises(ValueError, match="targets must all run the model the same way"):
        GradCAM(retinanet, target_layers=["backbone.layer3"])(images, [DetectionTarget(), ClassifierTarget(0)])


def test_box_far_from_every_prior_scores_zero(retinanet):
    output = BoxScoreTarget([0, 0, 64, 64], 0).model_output(retinanet, _images())
    assert output.detections is None
    assert BoxScoreTarget([1000, 1000, 1001, 1001], 0)(output, 0) == 0


def _grad_cam_by_hand(model, layer, images, scalar_fn):
    """Grad-CAM written out: hook the layer during dense_predictions, autograd.grad of the summed scalars,
    channel weights = mean gradient, ReLU, per-image min-max, bilinear resize, min-max."""
    acts = []
    handle = layer.register_forward_hook(lambda m, i, o: acts.append(o))
    scores, boxes = model.dense_predictions(images)
    handle.remove()
    (grad,) = torch.autograd.grad(sum(scalar_fn(scores, boxes, i) for i in range(images.shape[0])), acts)
    m = (grad.mean(dim=(2, 3), keepdim=True) * acts[0]).sum(1).detach().clamp(min=0)
    m = m - m.flatten(1).min(1).values[:, None, None]
    m = m / (m.flatten(1).max(1).values[:, None, None] + 1e-7)
    m = torch.nn.functional.interpolate(m[:, None], size=images.shape[-2:], mode="bilinear")[:, 0]
    m = m - m.flatten(1).min(1).values[:, None, None]
    return m / (m.flatten(1).max(1).values[:, None, None] + 1e-7)


@pytest.mark.parametrize("name", DETECTORS)
def test_grad_cam_of_each_dense_detector(name):
    """Explained through dense_predictions (predict runs under no grad and is not recorded, or the layer would
    count twice); the map equals Grad-CAM written out on the scores of the priors overlapping the detection."""
    model = _model(name, num_classes=4, score_thresh=0.0)  # every candidate, up to max_detections
    images = _images(seed=4)  # a seed where untrained CenterNet finds a proper box in both images
    cam = GradCAM(model, target_layers=["backbone.layer3"])
    assert torch.equal(cam(images), cam(images, DetectionTarget(box_index=0)))  # None: the top detection
    # untrained FCOS/CenterNet predict some zero-area boxes, which overlap no prior: explain proper ones
    chosen = []
    for det in model.predict(images):
        k = int(((det.boxes[:, 2] > det.boxes[:, 0]) & (det.boxes[:, 3] > det.boxes[:, 1])).nonzero()[0, 0])
        chosen.append((k, det.boxes[k], int(det.labels[k])))
    targets = [DetectionTarget(box_index=k) for k, _, _ in chosen]
    maps = cam(images, targets)

    def scalar(scores, boxes, i):
        _, box, label = chosen[i]
        return scores[i, box_iou(box[None], boxes[i].detach())[0] > 0.5, label].sum()

    assert maps.shape == (2, 64, 64)
    assert torch.allclose(maps, _grad_cam_by_hand(model, model.backbone.layer3, images, scalar), atol=1e-5)
    single = torch.cat([cam(images[i : i + 1], targets[i]) for i in range(2)])
    assert torch.allclose(maps, single, atol=1e-5)


def test_score_cam_scores_masked_images_against_the_clean_images_detection(retinanet):
    images = _images(1)
    chosen = DetectionTarget().resolve(DetectionTarget().model_output(retinanet, images), 0)
    cam = ScoreCAM(retinanet, target_layers=["backbone.layer3"], batch_size=64)
    got = cam(images, DetectionTarget())
    assert torch.allclose(got, cam(images, BoxScoreTarget(chosen.box, chosen.label)), atol=1e-6)


def test_timm_model_inside_a_backbone_inside_a_detector():
    pytest.importorskip("timm")
    from cvzoo.backbones import TimmBackbone
    from cvzoo.detection import RetinaNet
    from cvzoo.heads import RetinaHead
    from cvzoo.necks import FPN

    torch.manual_seed(0)
    backbone = TimmBackbone("test_resnet", out_indices=(2, 3, 4))
    neck = FPN(backbone.feature_info, out_channels=32, extra_levels=2)
    model = RetinaNet(backbone, neck, RetinaHead(32, 3, 9, 1), score_thresh=THRESH).eval()
    images = _images()
    maps = GradCAM(model, target_layers=["backbone.model.layer3"])(images)
    assert maps.shape == (2, 64, 64) and (maps.amax(dim=(1, 2)) > 0.99).all()
    with pytest.raises(ValueError, match=r"'backbone.model.layr3'.*nearest names: \['backbone.model.layer3'"):
        GradCAM(model, target_layers=["backbone.model.layr3"])


def test_cam_target_base_defaults():
    class Half(CAMTarget):
        def __call__(self, output, index):
            return output[index, 0] / 2

    target = Half()
    model = torch.nn.Linear(2, 2)
    x = torch.randn(3, 2)
    assert torch.equal(target.model_output(model, x), model(x))
    assert target.resolve(None, 0) is target
