"""cvzoo.segmentation.metrics: mIoU, per-class IoU and pixel accuracy against confusion-matrix arithmetic
written here, accumulation over batches, and evaluate_segmentation over a list loader."""

from __future__ import annotations

import math

import pytest
import torch

from cvzoo.segmentation import NoopSegmenter, SegmentationMetrics, evaluate_segmentation

K = 5
IGNORE = 255


def _closed_form(preds: torch.Tensor, targets: torch.Tensor, num_classes: int, ignore_index: int = IGNORE):
    """Confusion matrix cm[t, p] over the pixels whose target is not ignore_index; IoU_c = cm[c, c] /
    (row_c + col_c - cm[c, c]) for the classes with row_c + col_c > 0 (NaN otherwise); mIoU = the mean of
    the defined IoUs; pixel accuracy = trace / total."""
    t = targets.flatten().tolist()
    p = preds.flatten().tolist()
    cm = [[0] * num_classes for _ in range(num_classes)]
    for ti, pi in zip(t, p):
        if ti != ignore_index:
            cm[ti][pi] += 1
    iou = []
    for c in range(num_classes):
        row, col = sum(cm[c]), sum(cm[r][c] for r in range(num_classes))
        union = row + col - cm[c][c]
        iou.append(cm[c][c] / union if row + col > 0 else float("nan"))
    defined = [v for v in iou if not math.isnan(v)]
    total = sum(map(sum, cm))
    return {"mIoU": sum(defined) / len(defined), "pixel_accuracy": sum(cm[c][c] for c in range(num_classes)) / total,
            "iou": iou}


def _masks():
    # 2 images, 4 x 5; class 3 never appears in a valid target nor in a valid prediction (it is predicted
    # only on ignored pixels, which must not make it count); class 4 is predicted but never a target;
    # class 2 is a target but never predicted
    targets = torch.tensor([
        [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1], [2, 2, 1, 1, IGNORE], [2, 2, IGNORE, IGNORE, IGNORE]],
        [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [2, 0, 0, 1, 1], [IGNORE, IGNORE, 0, 1, 1]],
    ])
    preds = torch.tensor([
        [[0, 0, 1, 1, 1], [0, 4, 1, 1, 0], [0, 1, 1, 1, 3], [0, 0, 3, 3, 3]],
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 4], [1, 0, 0, 1, 1], [3, 3, 0, 1, 1]],
    ])
    return preds, targets


def _check(result: dict[str, float], expected: dict, names=None) -> None:
    names = names or [str(c) for c in range(K)]
    assert result["mIoU"] == pytest.approx(expected["mIoU"], abs=1e-6)
    assert result["pixel_accuracy"] == pytest.approx(expected["pixel_accuracy"], abs=1e-6)
    for name, v in zip(names, expected["iou"]):
        if math.isnan(v):
            assert math.isnan(result[f"IoU/{name}"]), name
        else:
            assert result[f"IoU/{name}"] == pytest.approx(v, abs=1e-6), name


def test_metrics_equal_confusion_matrix_arithmetic():
    preds, targets = _masks()
    expected = _closed_form(preds, targets, K)
    assert math.isnan(expected["iou"][3])  # absent from both: no IoU
    assert expected["iou"][4] == 0.0 and expected["iou"][2] == 0.0  # false positives only / misses only
    # the hand-counted values the arithmetic must give
    assert expected["pixel_accuracy"] == pytest.approx(24 / 34)  # 34 valid pixels, 24 right
    assert expected["iou"][0] == pytest.approx(11 / (14 + 16 - 11))  # 14 targets, 16 predictions, 11 both
    metrics = SegmentationMetrics(K)
    metrics.update(preds, targets)
    result = metrics.compute()
    assert set(result) == {"mIoU", "pixel_accuracy", *(f"IoU/{c}" for c in range(K))}
    _check(result, expected)
    defined = [v for v in expected["iou"] if not math.isnan(v)]
    assert len(defined) == 4  # class 3 does not count in the mean
    assert result["mIoU"] == pytest.approx(sum(defined) / 4)


def test_update_over_several_batches_equals_one_big_update():
    g = torch.Generator().manual_seed(0)
    batches = []
    for b, h, w in [(2, 5, 7), (1, 9, 4), (3, 3, 3)]:  # different sizes
        t = torch.randint(0, K - 1, (b, h, w), generator=g)  # class K - 1 never a target
        t[torch.rand(b, h, w, generator=g) < 0.2] = IGNORE
        p = torch.randint(0, K - 2, (b, h, w), generator=g)  # classes K - 2 and K - 1 never predicted
        batches.append((p, t))
    split = SegmentationMetrics(K, class_names=list("abcde"))
    for p, t in batches:
        split.update(p, t)
    big_p = torch.cat([p.flatten() for p, _ in batches])[None]
    big_t = torch.cat([t.flatten() for _, t in batches])[None]
    whole = SegmentationMetrics(K, class_names=list("abcde"))
    whole.update(big_p, big_t)
    a, b = split.compute(), whole.compute()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], nan_ok=True), key
    _check(a, _closed_form(big_p, big_t, K), names=list("abcde"))
    assert math.isnan(a["IoU/e"]) and a["IoU/d"] == 0.0


def test_other_ignore_index():
    preds, targets = _masks()
    targets = torch.where(targets == IGNORE, torch.full_like(targets, -1), targets)
    metrics = SegmentationMetrics(K, ignore_index=-1)
    metrics.update(preds, targets)
    _check(metrics.compute(), _closed_form(preds, targets, K, ignore_index=-1))


def test_metric_errors():
    with pytest.raises(ValueError, match="class_names has 2 names but num_classes=5"):
        SegmentationMetrics(K, class_names=["a", "b"])
    metrics = SegmentationMetrics(K)
    with pytest.raises(ValueError, match=r"preds \(2, 3\) and targets \(2, 4\)"):
        metrics.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))


def test_evaluate_segmentation_on_noop_segmenter():
    model = NoopSegmenter(3)
    with torch.no_grad():
        model.logits.copy_(torch.tensor([0.0, 2.0, -1.0]))  # predicts class 1 everywhere
    g = torch.Generator().manual_seed(0)
    loader = []
    for h, w in [(6, 7), (5, 9)]:
        t = torch.randint(0, 3, (2, h, w), generator=g)
        t[:, 0] = IGNORE
        loader.append((torch.randn(2, 3, h, w, generator=g), t))
    model.train()
    result = evaluate_segmentation(model, loader, class_names=["bg", "road", "car"])
    assert model.training  # the mode is restored
    all_t = torch.cat([t.flatten() for _, t in loader])
    expected = _closed_form(torch.ones_like(all_t), all_t, 3)
    _check(result, expected, names=["bg", "road", "car"])
    assert result["IoU/bg"] == 0.0 and result["IoU/car"] == 0.0  # never predicted, but present: count as 0
    valid = all_t[all_t != IGNORE]
    assert result["pixel_accuracy"] == pytest.approx(float((valid == 1).float().mean()))
