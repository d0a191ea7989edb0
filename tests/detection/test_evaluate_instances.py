"""cvzoo.detection.evaluate beyond boxes: mask mAP (known mask IoUs, and one scene checked against pycocotools'
COCOeval(iouType="segm") run here on RLE masks), keypoint OKS AP (against the closed form
OKS = mean_i exp(-d_i^2 / (2 s^2 (2 sigma_i)^2)) over labelled keypoints), 3D errors of matched pairs against
hand-computed values, iou_types validation, and `evaluate` over a stub model."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from cvzoo.detection.evaluate import COCO_KEYPOINT_SIGMAS, DetectionEvaluator, box3d_errors, evaluate
from cvzoo.detection.structures import Detections

pytest.importorskip("torchmetrics")
mask_utils = pytest.importorskip("pycocotools.mask")
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval, Params  # noqa: E402

H, W = 160, 200
# COCOeval's OKS thresholds (matched when OKS >= threshold)
OKS_THRESHOLDS = np.linspace(0.5, 0.95, 10)


def _rect(x1: int, y1: int, x2: int, y2: int, value: float = 1.0) -> torch.Tensor:
    m = torch.zeros(H, W)
    m[y1:y2, x1:x2] = value
    return m


def _ellipse(cx: float, cy: float, rx: float, ry: float) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    return ((((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2) <= 1).float()


def _box_of(mask: torch.Tensor) -> torch.Tensor:
    ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
    return torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()


def _dets(boxes, scores, labels, **extras) -> Detections:
    return Detections(torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                      torch.as_tensor(scores, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.int64),
                      extras)


def _evaluate(predictions, targets, **kwargs) -> dict:
    ev = DetectionEvaluator(**kwargs)
    ev.update(predictions, targets)
    return ev.compute()


# ---------------------------------------------------------------------------------------------------- masks


def _one_rect_scene(pred_mask: torch.Tensor):
    gt_mask = _rect(20, 30, 120, 130)  # 100 x 100: COCO "large"
    box = torch.tensor([[20.0, 30, 120, 130]])
    target = {"boxes": box, "labels": torch.tensor([0]), "masks": gt_mask[None].bool()}
    return [_dets(box, [0.9], [0], masks=pred_mask[None])], [target]


def test_perfect_masks_give_segm_map_one():
    preds, targets = _one_rect_scene(_rect(20, 30, 120, 130, 0.8))
    result = _evaluate(preds, targets, iou_types=("bbox", "segm"))
    for key in ("map", "segm_map", "segm_map_50", "segm_map_75", "segm_map_large", "segm_mar_100"):
        assert result[key] == pytest.approx(1.0), key
    assert result["segm_map_small"] == -1.0
    assert result["segm_per_class"] == {"0": pytest.approx(1.0)}


def test_mask_at_iou_0_6_counts_at_half_but_not_three_quarters_and_boxes_are_unaffected():
    shifted = _rect(45, 30, 145, 130, 0.7)  # 25 px right: IoU 75 * 100 / (125 * 100) = 0.6
    gt_rle = mask_utils.encode(np.asfortranarray(_rect(20, 30, 120, 130).numpy().astype(np.uint8)))
    pred_rle = mask_utils.encode(np.asfortranarray((shifted > 0.5).numpy().astype(np.uint8)))
    assert mask_utils.iou([pred_rle], [gt_rle], [0])[0, 0] == pytest.approx(0.6)
    preds, targets = _one_rect_scene(shifted)
    result = _evaluate(preds, targets, iou_types=("bbox", "segm"))
    assert result["segm_map_50"] == pytest.approx(1.0)
    assert result["segm_map_75"] == pytest.approx(0.0)
    assert result["map"] == pytest.approx(1.0)  # the predicted box is exact
    assert result["map_75"] == pytest.approx(1.0)


def test_mask_probabilities_are_binarised_at_half():
    prob = _rect(20, 30, 120, 130, 0.9) + _rect(120, 30, 220, 130, 0.4)  # the halo at 0.4 is background
    preds, targets = _one_rect_scene(prob)
    assert _evaluate(preds, targets, iou_types=("segm",))["segm_map"] == pytest.approx(1.0)


def _segm_scene():
    """Three images, two classes, objects of all three COCO sizes, shifted masks, misses and false positives."""
    a, b = _ellipse(70, 80, 60, 55), _rect(150, 20, 170, 40)  # large ellipse, small square
    c, d = _rect(20, 20, 70, 60), _ellipse(140, 100, 40, 30)  # medium rectangle, large-ish ellipse
    fp0 = _ellipse(160, 130, 15, 20)
    targets = [
        {"boxes": torch.stack([_box_of(a), _box_of(b)]), "labels": torch.tensor([0, 1]),
         "masks": torch.stack([a, b]).to(torch.uint8)},
        {"boxes": torch.stack([_box_of(c), _box_of(d)]), "labels": torch.tensor([0, 1]),
         "masks": torch.stack([c, d]).bool()},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, H, W)},
    ]
    p_a = torch.roll(a, 8, dims=1) * 0.8 + 0.3 * (1 - torch.roll(a, 8, dims=1))  # shifted, halo below 0.5
    p_b = _rect(152, 21, 171, 40, 0.95)
    p_c = _rect(32, 20, 82, 60, 0.6)  # shifted 12 px
    p_d = torch.roll(d, (-20, 30), dims=(0, 1)) * 0.7  # far off: low IoU
    p_fp = _rect(10, 100, 40, 150, 0.9)
    masks = [torch.stack([fp0 * 0.9, p_a, p_b]), torch.stack([p_c, p_d]), p_fp[None]]
    scores = [[0.95, 0.9, 0.6], [0.7, 0.4], [0.5]]
    labels = [[0, 0, 1], [0, 1], [0]]
    preds = [_dets(torch.stack([_box_of(m) for m in ms]), s, lab, masks=ms) for ms, s, lab in
             zip(masks, scores, labels)]
    return preds, targets


def _pycocotools_segm(preds, targets, cat_ids=None) -> np.ndarray:
    """COCOeval(iouType="segm") run directly on RLE-encoded masks."""
    images, annotations, results = [], [], []
    for image_id, (p, t) in enumerate(zip(preds, targets)):
        images.append({"id": image_id, "height": H, "width": W})
        for box, label, mask in zip(t["boxes"].tolist(), t["labels"].tolist(), t["masks"]):
            rle = mask_utils.encode(np.asfortranarray((mask != 0).numpy().astype(np.uint8)))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label,
                                "segmentation": rle, "area": float(mask_utils.area(rle)), "iscrowd": 0,
                                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
        for score, label, mask in zip(p.scores.tolist(), p.labels.tolist(), p.extras["masks"]):
            rle = mask_utils.encode(np.asfortranarray((mask > 0.5).numpy().astype(np.uint8)))
            results.append({"image_id": image_id, "category_id": label, "segmentation": rle, "score": score})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations, "categories": [{"id": 0}, {"id": 1}]}
        gt.createIndex()
        coco_eval = COCOeval(gt, gt.loadRes(results), iouType="segm")
        if cat_ids is not None:
            coco_eval.params.catIds = cat_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval.stats


def test_segm_map_equals_pycocotools_cocoeval():
    preds, targets = _segm_scene()
    result = _evaluate(preds, targets, iou_types=("bbox", "segm"))
    stats = _pycocotools_segm(preds, targets)
    assert 0.1 < stats[0] < 0.9  # a non-trivial case
    keys = ("segm_map", "segm_map_50", "segm_map_75", "segm_map_small", "segm_map_medium", "segm_map_large")
    for j, key in enumerate(keys):
        assert result[key] == pytest.approx(stats[j], abs=1e-6), key
    assert result["segm_mar_100"] == pytest.approx(stats[8], abs=1e-6)
    for c in (0, 1):
        assert result["segm_per_class"][str(c)] == pytest.approx(_pycocotools_segm(preds, targets, [c])[0], abs=1e-6)


def test_box_size_buckets_use_box_areas_when_masks_are_evaluated_too():
    box = torch.tensor([[0.0, 0, 150, 150]])  # box area 22500: large; its mask 20 x 20 = 400: small
    mask = _rect(10, 10, 30, 30)[None].bool()
    preds = [_dets(box, [0.9], [0], masks=mask.float())]
    result = _evaluate(preds, [{"boxes": box, "labels": torch.tensor([0]), "masks": mask}], iou_types=("bbox", "segm"))
    assert (result["map_large"], result["map_small"]) == (pytest.approx(1.0), -1.0)
    assert (result["segm_map_small"], result["segm_map_large"]) == (pytest.approx(1.0), -1.0)


def test_no_predicted_mask_anywhere_gives_zero_not_minus_one():
    _, targets = _segm_scene()
    empty = [_dets(torch.zeros(0, 4), [], []) for _ in targets]  # no "masks" needed when there is no detection
    result = _evaluate(empty, targets, iou_types=("segm",))
    assert result["segm_map"] == 0.0
    assert "map" not in result  # only the requested iou types


def test_masks_of_another_size_raise():
    preds, targets = _one_rect_scene(torch.zeros(H, W + 1))
    with pytest.raises(ValueError, match=r"predictions\[0\]\['masks'\]"):
        _evaluate(preds, targets, iou_types=("segm",))


# ------------------------------------------------------------------------------------------------ keypoints


def _oks(d: float, area: float, sigmas) -> float:
    """Closed form: every labelled keypoint displaced by d; s^2 = area, k = 2 sigma."""
    return float(np.mean([math.exp(-d ** 2 / (2 * area * (2 * s) ** 2)) for s in sigmas]))


def _expected_ap(oks: float) -> float:
    """One ground truth, one detection: AP is 1 at each threshold the OKS reaches, 0 elsewhere."""
    assert np.abs(OKS_THRESHOLDS - oks).min() > 0.005  # away from thresholds: no float ties
    return float((oks >= OKS_THRESHOLDS).mean())


def _keypoint_scene(k: int, d: float, visibility=None, masks=None):
    gt_kp = torch.stack([torch.linspace(30, 120, k), torch.linspace(40, 130, k), torch.full((k,), 2.0)], -1)
    if visibility is not None:
        gt_kp[:, 2] = torch.as_tensor(visibility, dtype=torch.float32)
    box = torch.tensor([[20.0, 30, 120, 130]])  # 100 x 100: s^2 = 10000 without masks
    target = {"boxes": box, "labels": torch.tensor([0]), "keypoints": gt_kp[None]}
    if masks is not None:
        target["masks"] = masks[None]
    direction = torch.tensor([0.6, 0.8])  # unit vector: every keypoint moves by exactly d
    pred_kp = gt_kp.clone()
    pred_kp[:, :2] += d * direction
    pred_kp[:, 2] = 1.0
    return [_dets(box, [0.8], [0], keypoints=pred_kp[None])], [target]


def test_default_sigmas_are_cocos():
    assert np.allclose(COCO_KEYPOINT_SIGMAS, Params(iouType="keypoints").kpt_oks_sigmas)


def test_perfect_keypoints_give_one():
    preds, targets = _keypoint_scene(17, 0.0)
    result = _evaluate(preds, targets, iou_types=("keypoints",))
    for key in ("keypoints_map", "keypoints_map_50", "keypoints_map_75", "keypoints_map_large"):
        assert result[key] == pytest.approx(1.0), key


@pytest.mark.parametrize("d", [10.0, 6.0, 3.0])
def test_displaced_keypoints_uniform_sigma_follow_the_closed_form(d):
    k = 5  # not 17: uniform sigma 0.05
    oks = _oks(d, 100 * 100, [0.05] * k)
    preds, targets = _keypoint_scene(k, d)
    result = _evaluate(preds, targets, iou_types=("keypoints",))
    assert result["keypoints_map"] == pytest.approx(_expected_ap(oks), abs=1e-9)
    if d == 10.0:
        assert 0.5 < oks < 0.75  # exp(-0.5) = 0.607
        assert result["keypoints_map_50"] == pytest.approx(1.0)
        assert result["keypoints_map_75"] == pytest.approx(0.0)


@pytest.mark.parametrize("d", [6.0, 12.0])
def test_displaced_keypoints_coco_sigmas_follow_the_closed_form(d):
    oks = _oks(d, 100 * 100, Params(iouType="keypoints").kpt_oks_sigmas)
    if d == 12.0:  # tells COCO's sigmas from a uniform 0.05: AP 0.2 against 0
        assert _expected_ap(oks) == pytest.approx(0.2) and _expected_ap(_oks(d, 100 * 100, [0.05])) == 0.0
    preds, targets = _keypoint_scene(17, d)
    result = _evaluate(preds, targets, iou_types=("keypoints",))
    assert result["keypoints_map"] == pytest.approx(_expected_ap(oks), abs=1e-9)


def test_keypoint_sigmas_argument():
    sigmas = [0.1, 0.02, 0.05, 0.08]
    oks = _oks(6.0, 100 * 100, sigmas)
    preds, targets = _keypoint_scene(4, 6.0)
    result = _evaluate(preds, targets, iou_types=("keypoints",), keypoint_sigmas=sigmas)
    assert result["keypoints_map"] == pytest.approx(_expected_ap(oks), abs=1e-9)
    with pytest.raises(ValueError, match="keypoint_sigmas"):
        _evaluate(preds, targets, iou_types=("keypoints",), keypoint_sigmas=[0.05] * 3)


def test_oks_scale_is_the_mask_area_when_masks_are_given():
    mask = _rect(40, 50, 90, 100).bool()  # 50 x 50 = 2500 inside the 100 x 100 box
    d = 5.0
    oks = _oks(d, 2500, [0.05] * 4)  # exp(-0.5); with the box area it would be exp(-0.125)
    preds, targets = _keypoint_scene(4, d, masks=mask)
    result = _evaluate(preds, targets, iou_types=("keypoints",))
    assert result["keypoints_map"] == pytest.approx(_expected_ap(oks), abs=1e-9)
    assert _expected_ap(oks) != _expected_ap(_oks(d, 10000, [0.05] * 4))


def test_unlabelled_keypoints_are_ignored():
    preds, targets = _keypoint_scene(4, 0.0, visibility=[2, 0, 1, 0])
    preds[0].extras["keypoints"][0, [1, 3], :2] += 60.0  # far off, but unlabelled in the ground truth
    result = _evaluate(preds, targets, iou_types=("keypoints",))
    assert result["keypoints_map"] == pytest.approx(1.0)
    # the same prediction against fully labelled ground truth fails
    targets[0]["keypoints"][0, :, 2] = 2.0
    assert _evaluate(preds, targets, iou_types=("keypoints",))["keypoints_map"] < 0.5


def test_object_without_labelled_keypoints_is_ignored():
    preds, targets = _keypoint_scene(4, 0.0)
    box2 = torch.tensor([[130.0, 20, 190, 90]])
    targets[0]["boxes"] = torch.cat([targets[0]["boxes"], box2])
    targets[0]["labels"] = torch.tensor([0, 0])
    targets[0]["keypoints"] = torch.cat([targets[0]["keypoints"], torch.zeros(1, 4, 3)])
    # a detection on the unlabelled object: neither a miss nor a false positive
    extra_kp = torch.tensor([[[140.0, 30, 1], [150, 40, 1], [160, 50, 1], [170, 60, 1]]])
    p = preds[0]
    preds = [_dets(torch.cat([p.boxes, box2]), [0.8, 0.9], [0, 0],
                   keypoints=torch.cat([p.extras["keypoints"], extra_kp]))]
    assert _evaluate(preds, targets, iou_types=("keypoints",))["keypoints_map"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ 3D errors


def _obj3d(boxes, labels, center, size, yaw, scores=None, depth=None) -> dict:
    out = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
           "labels": torch.tensor(labels, dtype=torch.int64), "center3d": torch.tensor(center).reshape(-1, 3),
           "size3d": torch.tensor(size).reshape(-1, 3), "yaw": torch.tensor(yaw, dtype=torch.float32)}
    if scores is not None:
        out["scores"] = torch.tensor(scores)
    if depth is not None:
        out["depth"] = torch.tensor(depth)
    return out


def _box3d_scene():
    targets = [
        _obj3d([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 1], [[1.0, 2, 10], [5, 0, 20]], [[2.0, 1, 4], [1, 1, 1]],
               [0.5, 0.0]),
        _obj3d([[0, 0, 10, 10], [50, 50, 60, 60]], [0, 0], [[0.0, 0, 30], [0, 0, 40]], [[1.0, 2, 3], [1, 1, 1]],
               [-math.pi + 0.1, 0.0]),
    ]
    preds = [
        # B: exact box, lower score; A: IoU 0.7 with the first object, highest score of its class; C: wrong class
        _obj3d([[0, 0, 10, 10], [0, 0, 10, 7], [20, 20, 30, 30]], [0, 0, 0],
               [[1.0, 2, 11], [4, 6, 10], [5, 0, 20]], [[2.0, 1, 4], [2.5, 1, 3], [1, 1, 1]], [0.5, 0.7, 0.0],
               scores=[0.8, 0.9, 0.95]),
        _obj3d([[0, 0, 10, 10]], [0], [[0.0, 0, 32]], [[1.0, 2, 3]], [math.pi - 0.1], scores=[0.6], depth=[29.0]),
    ]
    return preds, targets


def test_box3d_errors_hand_computed():
    preds, targets = _box3d_scene()
    # matched: A with the first object (center |(3, 4, 0)| = 5, depth 0, size (0.5 + 0 + 1) / 3, yaw 0.2) and the
    # second image's object (center 2, depth |29 - 30| = 1 from "depth", size 0, yaw wrapped 0.2); 2 of 4 matched
    result = box3d_errors(preds, targets)
    expected = {"center_error": 3.5, "depth_error": 0.5, "size_error": 0.25, "yaw_error": 0.2, "matched": 0.5}
    assert result == pytest.approx(expected, abs=1e-6)


def test_box3d_errors_greedy_by_score_respects_iou_thresh():
    preds, targets = _box3d_scene()
    # at 0.75 A (IoU 0.7) matches nothing and B takes the first object: center 1, depth 1, size 0, yaw 0
    result = box3d_errors(preds, targets, iou_thresh=0.75)
    expected = {"center_error": 1.5, "depth_error": 1.0, "size_error": 0.0, "yaw_error": 0.1, "matched": 0.5}
    assert result == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(("pred", "gt", "err"), [
    (math.pi - 0.1, -math.pi + 0.1, 0.2), (0.3, 0.3 + 2 * math.pi, 0.0), (0.0, math.pi, math.pi),
    (-2.0, 2.0, 2 * math.pi - 4.0), (0.1, -0.2, 0.3), (5 * math.pi + 0.25, 0.0, math.pi - 0.25),
])
def test_yaw_error_wraps(pred, gt, err):
    box = [[0, 0, 10, 10]]
    result = box3d_errors([_obj3d(box, [0], [[0.0, 0, 5]], [[1.0, 1, 1]], [pred], scores=[1.0])],
                          [_obj3d(box, [0], [[0.0, 0, 5]], [[1.0, 1, 1]], [gt])])
    assert result["yaw_error"] == pytest.approx(err, abs=1e-6)  # float32 inputs
    assert 0.0 <= result["yaw_error"] <= math.pi


def test_box3d_errors_unmatched_lowers_matched_and_nothing_matched_is_nan():
    preds, targets = _box3d_scene()
    targets[1] = _obj3d([[0, 0, 10, 10], [50, 50, 60, 60], [70, 70, 80, 80]], [0, 0, 1],
                        [[0.0, 0, 30], [0, 0, 40], [0, 0, 50]], [[1.0, 2, 3], [1, 1, 1], [1, 1, 1]],
                        [-math.pi + 0.1, 0.0, 0.0])
    assert box3d_errors(preds, targets)["matched"] == pytest.approx(2 / 5)
    none = box3d_errors([_obj3d([], [], [], [], [], scores=[])], [targets[0]])
    assert none["matched"] == 0.0
    assert math.isnan(none["center_error"]) and math.isnan(none["yaw_error"])


def test_box3d_errors_validation():
    preds, targets = _box3d_scene()
    with pytest.raises(ValueError, match="iou_thresh"):
        box3d_errors(preds, targets, iou_thresh=0.0)
    del preds[1]["yaw"]
    with pytest.raises(ValueError, match=r"predictions\[1\].*yaw"):
        box3d_errors(preds, targets)


# -------------------------------------------------------------------------------------- validation, evaluate


@pytest.mark.parametrize("iou_types", [("bbox", "mask"), ("keypoint",), "box", ()])
def test_bad_iou_types_raise(iou_types):
    with pytest.raises(ValueError, match="iou_types"):
        DetectionEvaluator(iou_types=iou_types)


def test_bad_iou_types_named_in_the_message():
    with pytest.raises(ValueError, match="'mask'"):
        DetectionEvaluator(iou_types=("bbox", "mask"))


def test_missing_masks_or_keypoints_raise():
    preds, targets = _one_rect_scene(_rect(20, 30, 120, 130))
    del targets[0]["masks"]
    with pytest.raises(ValueError, match=r"targets\[0\] has no 'masks'"):
        _evaluate(preds, targets, iou_types=("segm",))
    with pytest.raises(ValueError, match=r"targets\[0\] has no 'keypoints'"):
        _evaluate(preds, targets, iou_types=("keypoints",))


KP = torch.tensor([[[30.0, 40, 2], [60, 70, 2], [90, 100, 0], [110, 120, 1]]])
MODEL_TARGETS = {
    0: {"boxes": torch.tensor([[20.0, 30, 120, 130]]), "labels": torch.tensor([0]),
        "masks": _rect(20, 30, 120, 130)[None].bool(), "keypoints": KP},
    1: {"boxes": torch.tensor([[50.0, 20, 170, 150]]), "labels": torch.tensor([1]),
        "masks": _ellipse(110, 85, 60, 65)[None].bool(), "keypoints": KP + torch.tensor([30.0, -10, 0])},
}


class FixedDetector(nn.Module):
    """predict returns each image's ground truth (told apart by pixel value) as detections with extras."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def predict(self, images) -> list[Detections]:
        out = []
        for img in images:
            t = MODEL_TARGETS[int(img[0, 0, 0])]
            out.append(_dets(t["boxes"], [0.9], t["labels"], masks=t["masks"][:, None].float() * 0.8,
                             keypoints=t["keypoints"], keypoint_scores=torch.ones(1, 4)))
        return out


def test_evaluate_with_a_stub_model_returns_all_keys():
    loader = [(torch.stack([torch.full((3, H, W), float(i))]), [MODEL_TARGETS[i]]) for i in MODEL_TARGETS]
    model = FixedDetector().train()
    result = evaluate(model, loader, iou_types=("bbox", "segm", "keypoints"), class_names=["a", "b"])
    assert model.training
    for key in ("map", "map_50", "segm_map", "segm_map_50", "segm_map_75", "keypoints_map", "keypoints_map_50",
                "keypoints_map_75"):
        assert result[key] == pytest.approx(1.0), key
    assert set(result["per_class"]) == set(result["segm_per_class"]) == {"a", "b"}
    with pytest.raises(ValueError, match="'segmentation'"):
        evaluate(model, loader, iou_types=("segmentation",))
