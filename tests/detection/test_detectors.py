"""The zoo's micro dense detectors (RetinaNet, FCOS, ATSS, CenterNet) through their public boundary.

Loss totals are checked against the documented weights, per-image normalisation against closed forms
(an image without boxes adds nothing to the box terms), validation by the messages it gives, post-
processing by NMS/clipping invariants, compiled graphs against eager, and learning by overfitting.
"""

from __future__ import annotations

import time

import pytest
import torch
from torchvision.ops import box_iou

from cvzoo import zoo
from cvzoo.detection import ATSS, FCOS, CenterNet, Detections, RetinaNet, TargetBatch, evaluate
from cvzoo.heads.dense import ATSSOutput, CenterNetOutput, DenseOutput, FCOSOutput

NAMES = ["retinanet_micro", "fcos_micro", "atss_micro", "centernet_micro"]
NUM_CLASSES = 4
# the documented total: loss = sum(weight * term)
WEIGHTS = {
    "retinanet_micro": {"classification": 1.0, "box_regression": 1.0},
    "fcos_micro": {"classification": 1.0, "box_regression": 1.0, "centerness": 1.0},
    "atss_micro": {"classification": 1.0, "box_regression": 2.0, "centerness": 1.0},
    "centernet_micro": {"heatmap": 1.0, "size": 0.1, "offset": 1.0},
}
BOX_TERMS = {
    "retinanet_micro": ("box_regression",),
    "fcos_micro": ("box_regression", "centerness"),
    "atss_micro": ("box_regression", "centerness"),
    "centernet_micro": ("size", "offset"),
}
BOX_OUTPUTS = {  # head outputs that only box terms read
    "retinanet_micro": ("box_deltas",),
    "fcos_micro": ("box_distances", "centerness"),
    "atss_micro": ("box_deltas", "centerness"),
    "centernet_micro": ("sizes", "offsets"),
}
TYPES = {
    "retinanet_micro": (RetinaNet, DenseOutput),
    "fcos_micro": (FCOS, FCOSOutput),
    "atss_micro": (ATSS, ATSSOutput),
    "centernet_micro": (CenterNet, CenterNetOutput),
}


def _model(name: str, **kwargs):
    torch.manual_seed(0)
    return zoo.create_model(name, num_classes=NUM_CLASSES, **kwargs)


def _images(batch: int = 2, h: int = 64, w: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _target(boxes, labels) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels).long()}


A = _target([[4.0, 6, 40, 50], [30, 20, 60, 44]], [0, 3])  # image with two boxes (64 x 64)
B = _target([[10.0, 12, 34, 30]], [2])
EMPTY = _target([], [])


@pytest.fixture(scope="module")
def models():
    """One instance per zoo name for the tests that only validate input (nothing is trained or mutated)."""
    return {name: _model(name) for name in NAMES}


# ---- the loss ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_loss_is_documented_weighted_sum_and_backward_reaches_every_parameter(name):
    model = _model(name).train()
    losses = model.loss(_images(), [A, B])
    assert set(losses) == set(WEIGHTS[name]) | {"loss"}
    for key, value in losses.items():
        assert value.shape == () and torch.isfinite(value), key
        assert value > 0, key
    expected = sum(w * losses[k] for k, w in WEIGHTS[name].items())
    torch.testing.assert_close(losses["loss"], expected, rtol=1e-6, atol=0.0)
    losses["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient reaches {missing}"
    for n, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), n
    zero = [n for n, p in model.named_parameters() if p.requires_grad and not p.grad.abs().sum() > 0]
    assert not zero, f"gradient is exactly zero for {zero}"


def test_centernet_size_weight_is_used():
    model = _model("centernet_micro", size_weight=0.5)
    losses = model.loss(_images(), [A, B])
    torch.testing.assert_close(losses["loss"], losses["heatmap"] + 0.5 * losses["size"] + losses["offset"])


@pytest.mark.parametrize("name", NAMES)
def test_target_batch_gives_the_same_loss_as_dicts(name):
    model = _model(name).eval()  # eval: BatchNorm uses running stats, two calls see the same features
    x = _images()
    from_dicts = model.loss(x, [A, B])
    from_batch = model.loss(x, TargetBatch.from_list([A, B], 2, NUM_CLASSES))
    for k in from_dicts:
        torch.testing.assert_close(from_batch[k], from_dicts[k])


@pytest.mark.parametrize("name", NAMES)
def test_empty_targets_give_finite_loss_and_zero_box_terms(name):
    model = _model(name).train()
    losses = model.loss(_images(), [EMPTY, EMPTY])
    for key, value in losses.items():
        assert torch.isfinite(value), key
    for key in BOX_TERMS[name]:
        assert losses[key].item() == 0.0, key
    assert losses["loss"] > 0  # the classification/heatmap term still pushes scores down
    losses["loss"].backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), n


@pytest.mark.parametrize("name", NAMES)
def test_image_without_boxes_adds_nothing_to_box_terms(name):
    """Closed forms of each detector's normalisation, with an empty second image.

    RetinaNet (torchvision): per-image sums / max(1, fg_i), averaged over images -> box([A, E]) = box([A]) / 2,
    cls([A, E]) = (cls([A]) + cls([E])) / 2. FCOS/ATSS normalise by the batch's foreground, CenterNet by the
    batch's box count: box terms of [A, E] equal those of [A]; CenterNet's heatmap([A, E]) =
    heatmap([A]) + heatmap([E]) / len(A).
    """
    model = _model(name).eval()  # eval: each image's features do not depend on the rest of the batch
    x = _images()
    both = model.loss(x, [A, EMPTY])
    alone = model.loss(x[:1], [A])
    empty = model.loss(x[1:], [EMPTY])
    for key in BOX_TERMS[name]:
        assert alone[key] > 0
        factor = 0.5 if name == "retinanet_micro" else 1.0
        torch.testing.assert_close(both[key], factor * alone[key], rtol=1e-5, atol=1e-7)
    if name == "retinanet_micro":
        torch.testing.assert_close(both["classification"], (alone["classification"] + empty["classification"]) / 2,
                                   rtol=1e-5, atol=0.0)
    if name == "centernet_micro":
        torch.testing.assert_close(both["heatmap"], alone["heatmap"] + empty["heatmap"] / 2, rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("name", NAMES)
def test_box_outputs_of_an_empty_image_get_no_gradient(name):
    model = _model(name).train()
    captured = {}

    def keep(module, args, out):
        for field in BOX_OUTPUTS[name]:
            getattr(out, field).retain_grad()
        captured["out"] = out

    model.head.register_forward_hook(keep)
    losses = model.loss(_images(), [A, EMPTY])
    sum(losses[k] for k in BOX_TERMS[name]).backward()
    for field in BOX_OUTPUTS[name]:
        grad = getattr(captured["out"], field).grad
        assert grad[0].abs().sum() > 0, field
        assert (grad[1] == 0).all(), field


# ---- validation at the boundary -------------------------------------------------------------------


def _bad_targets():
    return [
        pytest.param([A], r"len\(targets\) is 1 but there are 2 images", id="too-few-targets"),
        pytest.param([A, B, B], r"len\(targets\) is 3 but there are 2 images", id="too-many-targets"),
        pytest.param({"boxes": A["boxes"], "labels": A["labels"]}, "list of dicts", id="dict-not-list"),
        pytest.param([A, {"boxes": B["boxes"]}], r"targets\[1\] must be a dict with 'boxes' and 'labels'",
                     id="missing-labels"),
        pytest.param([A, {"boxes": torch.tensor([1.0, 2, 3, 4]), "labels": torch.tensor([0])}],
                     r"targets\[1\]\['boxes'\] must be a \(N, 4\).*\(4,\)", id="boxes-1d"),
        pytest.param([A, {"boxes": torch.zeros(1, 5), "labels": torch.tensor([0])}],
                     r"targets\[1\]\['boxes'\] must be a \(N, 4\).*\(1, 5\)", id="boxes-5-columns"),
        pytest.param([A, {"boxes": B["boxes"], "labels": torch.tensor([0, 1])}],
                     r"targets\[1\]\['labels'\] must have shape \(1,\)", id="labels-length"),
        pytest.param([A, _target([[4.0, 6, 40, 50], [30, 10, 20, 40]], [0, 1])],
                     r"targets\[1\]\['boxes'\]\[1\] = \[30\.0, 10\.0, 20\.0, 40\.0\] is degenerate", id="x2<x1"),
        pytest.param([_target([[5.0, 6, 5, 50]], [0]), B],
                     r"targets\[0\]\['boxes'\]\[0\] = \[5\.0, 6\.0, 5\.0, 50\.0\]", id="zero-width"),
        pytest.param([A, _target([[5.0, 6, 30, 6]], [0])], r"targets\[1\]\['boxes'\]\[0\].*degenerate",
                     id="zero-height"),
        pytest.param([_target([[4.0, 6, 40, 50], [float("nan"), 1, 9, 9]], [0, 1]), B],
                     r"targets\[0\]\['boxes'\]\[1\] = \[nan, 1\.0, 9\.0, 9\.0\].*non-finite", id="nan-box"),
        pytest.param([A, _target([[1.0, 2, float("inf"), 9]], [0])], r"targets\[1\]\['boxes'\]\[0\].*non-finite",
                     id="inf-box"),
        pytest.param([A, _target([[1.0, 2, 20, 9]], [NUM_CLASSES])],
                     rf"targets\[1\]\['labels'\]\[0\] = {NUM_CLASSES} is out of range.*num_classes={NUM_CLASSES}",
                     id="label-too-large"),
        pytest.param([_target([[1.0, 2, 20, 9], [3, 4, 30, 30]], [0, -1]), B],
                     r"targets\[0\]\['labels'\]\[1\] = -1 is out of range", id="label-negative"),
        pytest.param([A, {"boxes": B["boxes"], "labels": torch.tensor([1.0])}],
                     r"targets\[1\]\['labels'\] must be integer class indices.*float32", id="labels-float"),
        pytest.param([A, {"boxes": B["boxes"], "labels": torch.tensor([True])}],
                     r"targets\[1\]\['labels'\] must be integer.*bool", id="labels-bool"),
        pytest.param(TargetBatch.from_list([A], 1, NUM_CLASSES), "targets hold 1 images but there are 2 images",
                     id="target-batch-size"),
    ]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("targets, match", _bad_targets())
def test_bad_targets_raise_value_error(models, name, targets, match):
    with pytest.raises(ValueError, match=match):
        models[name].loss(_images(), targets)


def test_integer_boxes_and_int32_labels_are_accepted(models):
    target = {"boxes": torch.tensor([[4, 6, 40, 50]]), "labels": torch.tensor([1], dtype=torch.int32)}
    losses = models["retinanet_micro"].loss(_images(1), [target])
    assert torch.isfinite(losses["loss"])


def _bad_images():
    good = _images(1)[0]
    nan = good.clone()
    nan[1, 3, 4] = float("nan")
    return [
        pytest.param(_images()[0], "must be 4-D", id="3d-tensor"),
        pytest.param(torch.randn(2, 1, 64, 64), r"has 1 channels.*expected 3", id="1-channel"),
        pytest.param(torch.zeros(2, 3, 64, 64, dtype=torch.uint8), r"dtype torch\.uint8", id="uint8"),
        pytest.param(torch.where(torch.rand(2, 3, 64, 64) > 0.99, float("nan"), 0.0), "NaN", id="nan-batch"),
        pytest.param(torch.full((2, 3, 64, 64), float("inf")), "NaN or inf", id="inf-batch"),
        pytest.param(torch.zeros(0, 3, 64, 64), "empty batch", id="empty-batch"),
        pytest.param(torch.zeros(2, 3, 16, 16), "too small", id="too-small"),
        pytest.param([], "non-empty list", id="empty-list"),
        pytest.param([good, good[0]], r"images\[1\] must be a \(C, H, W\) tensor, got \(64, 64\)", id="list-2d"),
        pytest.param([good, "image"], r"images\[1\] must be a \(C, H, W\) tensor, got str", id="list-str"),
        pytest.param([good, nan], r"images\[1\] contains NaN", id="list-nan"),
        pytest.param([good, good.to(torch.uint8)], r"images\[1\] has dtype torch\.uint8", id="list-uint8"),
        pytest.param([good, good[:1]], r"images\[1\] has 1 channels", id="list-1-channel"),
        pytest.param(good.numpy(), "must be", id="numpy"),
    ]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("images, match", _bad_images())
def test_bad_images_raise_value_error(models, name, images, match):
    with pytest.raises(ValueError, match=match):
        models[name].predict(images)
    with pytest.raises(ValueError, match=match):
        models[name].loss(images, [A, B])


@pytest.mark.parametrize("kwargs, match", [
    pytest.param({"score_thresh": -0.1}, "score_thresh", id="score-negative"),
    pytest.param({"score_thresh": 1.0}, "score_thresh", id="score-one"),
    pytest.param({"nms_thresh": 0.0}, "nms_thresh", id="nms-zero"),
    pytest.param({"nms_thresh": 1.5}, "nms_thresh", id="nms-above-one"),
    pytest.param({"max_detections": 0}, "max_detections", id="max-detections-zero"),
    pytest.param({"topk_candidates": 0}, "topk_candidates", id="topk-zero"),
])
@pytest.mark.parametrize("name", NAMES)
def test_predict_argument_validation(models, name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        models[name].predict(_images(), **kwargs)


# ---- predict ---------------------------------------------------------------------------------------


def _check_detections(dets: list[Detections], sizes: list[tuple[int, int]]) -> None:
    assert len(dets) == len(sizes)
    for d, (h, w) in zip(dets, sizes):
        assert isinstance(d, Detections)
        n = len(d.scores)
        assert d.boxes.shape == (n, 4) and d.labels.shape == (n,)
        assert d.labels.dtype == torch.int64
        assert ((d.labels >= 0) & (d.labels < NUM_CLASSES)).all()
        assert (d.scores[:-1] >= d.scores[1:]).all(), "detections are not sorted best first"
        assert (d.boxes >= 0).all()
        assert (d.boxes[:, 0::2] <= w).all() and (d.boxes[:, 1::2] <= h).all()


def _spread_boxes(model) -> None:
    """Untrained FCOS/CenterNet regress near-zero sizes (point-like boxes NMS cannot overlap): give the
    regression convs a positive bias so that neighbouring boxes overlap."""
    with torch.no_grad():
        if isinstance(model, FCOS):
            model.head.box_distances.bias.fill_(1.0)  # 1 stride each side
        elif isinstance(model, CenterNet):
            model.head.size[-1].bias.fill_(6.0)  # 6 x 6 cells


@pytest.mark.parametrize("name", NAMES)
def test_detected_boxes_are_well_formed_xyxy(name):
    """Detections are xyxy boxes (x2 >= x1, y2 >= y1) even from an untrained model."""
    model = _model(name).eval()
    for d in model.predict(_images(), score_thresh=0.0):
        assert len(d.boxes) > 0
        bad = d.boxes[(d.boxes[:, 2] < d.boxes[:, 0]) | (d.boxes[:, 3] < d.boxes[:, 1])]
        assert len(bad) == 0, f"{len(bad)} of {len(d.boxes)} boxes have x2 < x1 or y2 < y1, e.g. {bad[:3].tolist()}"


@pytest.mark.parametrize("name", NAMES)
def test_differently_sized_images(name):
    model = _model(name).eval()
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(3, 100, 120, generator=g), torch.randn(3, 64, 70, generator=g)
    targets = [_target([[10.0, 10, 110, 90], [60, 50, 100, 80]], [1, 2]), _target([[5.0, 5, 60, 40]], [3])]
    losses = model.loss([a, b], targets)
    assert all(torch.isfinite(v) for v in losses.values())
    dets = model.predict([a, b], score_thresh=0.0)
    _check_detections(dets, [(100, 120), (64, 70)])
    assert len(dets[0].scores) > 0 and len(dets[1].scores) > 0
    if name != "centernet_micro":  # anchors/points cover the padding: boxes there are clipped to the image's own edge
        assert ((dets[1].boxes[:, 2] == 70) | (dets[1].boxes[:, 3] == 64)).any()
    # each image's detections are its own: same result alone (same padded size) and with the order swapped
    for got, ref in [(dets[0], model.predict([a], score_thresh=0.0)[0]),
                     (dets[1], model.predict([b, a], score_thresh=0.0)[0])]:
        for x, y in zip(got, ref):
            torch.testing.assert_close(x, y)


@pytest.mark.parametrize("name", NAMES)
def test_predict_on_a_batch_tensor(name):
    model = _model(name).eval()
    dets = model.predict(_images(3, 64, 96), score_thresh=0.0)
    _check_detections(dets, [(64, 96)] * 3)
    assert all(len(d.scores) > 0 for d in dets)


@pytest.mark.parametrize("name", NAMES)
def test_max_detections_caps_the_count(name):
    model = _model(name).eval()
    x = _images()
    assert all(len(d.scores) > 7 for d in model.predict(x, score_thresh=0.0))
    capped = model.predict(x, score_thresh=0.0, max_detections=7)
    full = model.predict(x, score_thresh=0.0)
    for c, f in zip(capped, full):
        assert len(c.scores) == 7
        torch.testing.assert_close(c.scores, f.scores[:7])  # the best seven


@pytest.mark.parametrize("name", NAMES)
def test_nms_leaves_no_same_class_overlap_above_threshold(name):
    model = _model(name).eval()
    _spread_boxes(model)
    x = _images()
    kept = model.predict(x, score_thresh=0.0, nms_thresh=0.3, max_detections=1000)
    unfiltered = model.predict(x, score_thresh=0.0, nms_thresh=None, max_detections=1000)
    for d, u in zip(kept, unfiltered):
        assert 0 < len(d.scores) < len(u.scores)  # NMS removed something, and kept something
        for label in d.labels.unique():
            boxes = d.boxes[d.labels == label]
            iou = box_iou(boxes, boxes).fill_diagonal_(0).nan_to_num(0.0)  # nan: two zero-area boxes
            assert (iou <= 0.3 + 1e-6).all()
        # the best detection survives NMS
        assert d.scores[0] == u.scores[0]


@pytest.mark.parametrize("name", ["retinanet_micro", "fcos_micro", "atss_micro"])
def test_nms_none_keeps_every_candidate(name):
    """Without NMS (score_thresh 0, every score > 0) the count is the closed form sum_l min(topk, R_l * K)."""
    model = _model(name).eval()
    topk = 200
    dets = model.predict(_images(), score_thresh=0.0, nms_thresh=None, max_detections=100_000, topk_candidates=topk)
    a = model.head.num_anchors
    side = [8, 4, 2, 1, 1]  # P3-P7 of a 64 x 64 image
    expected = sum(min(topk, s * s * a * NUM_CLASSES) for s in side)
    for d in dets:
        assert len(d.scores) == expected
        assert (d.scores[:-1] >= d.scores[1:]).all()
    _spread_boxes(model)
    with_nms = model.predict(_images(), score_thresh=0.0, nms_thresh=0.5, max_detections=100_000,
                             topk_candidates=topk)
    assert all(len(n.scores) < expected for n in with_nms)


def test_centernet_nms_off_by_default_and_none_accepted():
    model = _model("centernet_micro").eval()
    assert model.nms_thresh is None
    dets = model.predict(_images(), score_thresh=0.0, nms_thresh=None)
    _check_detections(dets, [(64, 64)] * 2)
    assert all(0 < len(d.scores) <= model.topk_candidates for d in dets)


@pytest.mark.parametrize("name", NAMES)
def test_forward_returns_the_same_named_tuple_in_train_and_eval(name):
    model = _model(name)
    detector_type, output_type = TYPES[name]
    assert type(model) is detector_type
    x = _images()
    train_out = model.train()(x)
    eval_out = model.eval()(x)
    assert type(train_out) is type(eval_out) is output_type
    assert train_out._fields == model.signature.outputs
    for t, e in zip(train_out, eval_out):
        assert t.shape == e.shape and t.shape[0] == 2


# ---- torch.compile ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_compiled_loss_and_forward_match_eager(name):
    torch._dynamo.reset()
    model = _model(name).eval()  # eval: BatchNorm statistics do not move between the eager and compiled calls
    x = _images()
    targets = TargetBatch.from_list([A, B], 2, NUM_CLASSES)
    eager = model.loss(x, targets)
    compiled = torch.compile(model.loss, backend="eager", fullgraph=True)(x, targets)
    assert set(compiled) == set(eager)
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], atol=1e-5, rtol=1e-5)
    eager_out = model(x)
    compiled_out = torch.compile(model.forward, backend="eager", fullgraph=True)(x)
    assert type(compiled_out) is type(eager_out)
    for c, e in zip(compiled_out, eager_out):
        torch.testing.assert_close(c, e, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_inductor_compiled_retinanet_loss():
    torch._dynamo.reset()
    model = _model("retinanet_micro").eval()
    x = _images()
    targets = TargetBatch.from_list([A, B], 2, NUM_CLASSES)
    eager = model.loss(x, targets)
    compiled = torch.compile(model.loss, fullgraph=True)(x, targets)
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], atol=1e-4, rtol=1e-4)


# ---- learning --------------------------------------------------------------------------------------

COLOURS = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.2, 0.9]])  # class 0 red, class 1 blue


def _synthetic(n: int = 4, size: int = 128, seed: int = 0) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """n grey images in [0, 1] with 1-3 non-overlapping filled rectangles (20-55 px) of two colours."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        img = torch.full((3, size, size), 0.5)
        count = int(torch.randint(1, 4, (1,), generator=g))
        boxes, labels = [], []
        while len(boxes) < count:
            w, h = torch.randint(20, 56, (2,), generator=g).tolist()
            x1 = int(torch.randint(0, size - w, (1,), generator=g))
            y1 = int(torch.randint(0, size - h, (1,), generator=g))
            box = torch.tensor([x1, y1, x1 + w, y1 + h], dtype=torch.float32)
            if boxes and box_iou(box[None], torch.stack(boxes)).max() > 0:
                continue
            label = int(torch.randint(0, 2, (1,), generator=g))
            img[:, y1:y1 + h, x1:x1 + w] = COLOURS[label][:, None, None]
            boxes.append(box)
            labels.append(label)
        images.append(img)
        targets.append({"boxes": torch.stack(boxes), "labels": torch.tensor(labels)})
    return torch.stack(images), targets


def test_fcos_micro_overfits_four_synthetic_images():
    torch.manual_seed(0)
    images, targets = _synthetic()
    assert {int(label) for t in targets for label in t["labels"]} == {0, 1}
    model = zoo.create_model("fcos_micro", num_classes=2)
    x = model.signature.normalize(images)
    loader = [(x, targets)]
    assert evaluate(model, loader)["map_50"] < 0.5  # untrained
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    start, history = time.perf_counter(), []
    for step in range(1, 301):
        model.train()
        losses = model.loss(x, targets)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        if step % 5 == 0:
            history.append((step, evaluate(model, loader)["map_50"]))
            if history[-1][1] >= 0.9:
                break
    assert history[-1][1] >= 0.9, f"mAP50 by step: {history} ({time.perf_counter() - start:.0f} s)"


@pytest.mark.parametrize("name", NAMES)
def test_dense_predictions_hold_every_detection(name):
    """`dense_predictions` (differentiable, every prior) contains each detection `predict` returns: same box
    (clipped to the image) with the same score for the same class."""
    model = _model(name).eval()
    images = _images()
    scores, boxes = model.dense_predictions(images)
    assert scores.shape[:2] == boxes.shape[:2] and boxes.shape[-1] == 4 and scores.shape[-1] == model.num_classes
    for i, det in enumerate(model.predict(images, score_thresh=0.0)):
        h, w = images[i].shape[-2:] if isinstance(images, list) else images.shape[-2:]
        clipped = torch.stack([boxes[i, :, 0].clamp(0, w), boxes[i, :, 1].clamp(0, h),
                               boxes[i, :, 2].clamp(0, w), boxes[i, :, 3].clamp(0, h)], dim=-1)
        for box, score, label in zip(det.boxes[:5], det.scores[:5], det.labels[:5]):
            same = (scores[i, :, label] - score).abs() < 1e-6
            assert same.any()
            assert (clipped[same] - box).abs().amax(-1).min() < 1e-4
    assert scores.requires_grad and boxes.requires_grad
    scores.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
