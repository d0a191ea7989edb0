"""cvzoo.detection.structures: padding and boundary validation of TargetBatch.from_list."""

from __future__ import annotations

import pytest
import torch

from cvzoo.detection.structures import Detections, TargetBatch

NAN = float("nan")


def _targets() -> list[dict[str, torch.Tensor]]:
    return [
        {"boxes": torch.tensor([[1.0, 2.0, 10.0, 12.0], [5.0, 5.0, 9.0, 30.0]]), "labels": torch.tensor([3, 0])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
        {"boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0], [2.0, 3.0, 8.0, 9.0], [1.0, 1.0, 50.0, 60.0]]),
         "labels": torch.tensor([1, 4, 2])},
    ]


def test_from_list_pads_with_minus_one_and_zero_boxes():
    targets = _targets()
    tb = TargetBatch.from_list(targets, num_images=3, num_classes=5)
    assert tb.boxes.shape == (3, 3, 4) and tb.labels.shape == (3, 3)
    assert tb.boxes.dtype == torch.float32 and tb.labels.dtype == torch.int64
    for i, t in enumerate(targets):  # per-image reference: real rows first, then padding
        n = t["labels"].shape[0]
        torch.testing.assert_close(tb.boxes[i, :n], t["boxes"])
        assert tb.labels[i, :n].tolist() == t["labels"].tolist()
        assert tb.labels[i, n:].tolist() == [-1] * (3 - n)
        assert torch.equal(tb.boxes[i, n:], torch.zeros(3 - n, 4))
    assert tb.valid.tolist() == [[True, True, False], [False, False, False], [True, True, True]]


def test_from_list_all_empty_gives_one_padding_row():
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    tb = TargetBatch.from_list(targets, num_images=2, num_classes=3)
    assert tb.boxes.shape == (2, 1, 4)
    assert tb.labels.tolist() == [[-1], [-1]]
    assert not tb.valid.any()


def test_from_list_converts_integer_boxes_and_int32_labels():
    targets = [{"boxes": torch.tensor([[1, 2, 3, 4]]), "labels": torch.tensor([2], dtype=torch.int32)}]
    tb = TargetBatch.from_list(targets, num_images=1, num_classes=3)
    assert tb.boxes.dtype == torch.float32 and tb.labels.dtype == torch.int64
    assert tb.boxes.tolist() == [[[1.0, 2.0, 3.0, 4.0]]] and tb.labels.tolist() == [[2]]


def test_from_list_wrong_number_of_images():
    with pytest.raises(ValueError, match=r"len\(targets\) is 3 but there are 2 images"):
        TargetBatch.from_list(_targets(), num_images=2, num_classes=5)


def test_from_list_not_a_list():
    with pytest.raises(ValueError, match="list of dicts"):
        TargetBatch.from_list(_targets()[0], num_images=1, num_classes=5)


@pytest.mark.parametrize("missing", ["boxes", "labels"])
def test_from_list_missing_key(missing):
    targets = _targets()
    del targets[2][missing]
    with pytest.raises(ValueError, match=r"targets\[2\] must be a dict with 'boxes' and 'labels'"):
        TargetBatch.from_list(targets, num_images=3, num_classes=5)


@pytest.mark.parametrize("boxes", [torch.zeros(2, 5), torch.zeros(4), [[0.0, 0.0, 1.0, 1.0]] * 2])
def test_from_list_boxes_not_n_by_4(boxes):
    targets = _targets()
    targets[2] = {"boxes": boxes, "labels": torch.tensor([0, 1])}
    with pytest.raises(ValueError, match=r"targets\[2\]\['boxes'\] must be a \(N, 4\)"):
        TargetBatch.from_list(targets, num_images=3, num_classes=5)


@pytest.mark.parametrize("labels", [torch.tensor([1, 2, 3]), torch.tensor([[1, 2]]), [1, 2]])
def test_from_list_labels_shape_mismatch(labels):
    targets = _targets()
    targets[0]["labels"] = labels
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\] must have shape \(2,\)"):
        TargetBatch.from_list(targets, num_images=3, num_classes=5)


@pytest.mark.parametrize("labels", [torch.tensor([1.0, 0.0]), torch.tensor([True, False])])
def test_from_list_non_integer_labels(labels):
    targets = _targets()
    targets[0]["labels"] = labels
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\] must be integer"):
        TargetBatch.from_list(targets, num_images=3, num_classes=5)


@pytest.mark.parametrize("bad", [[5.0, 5.0, 5.0, 9.0], [6.0, 5.0, 4.0, 9.0], [1.0, 9.0, 4.0, 2.0],
                                 [1.0, 1.0, NAN, 4.0], [1.0, 1.0, float("inf"), 4.0]])
def test_from_list_degenerate_or_non_finite_box(bad):
    targets = _targets()
    targets[2]["boxes"][1] = torch.tensor(bad)
    with pytest.raises(ValueError, match=r"targets\[2\]\['boxes'\]\[1\] = .* degenerate or non-finite"):
        TargetBatch.from_list(targets, num_images=3, num_classes=5)


@pytest.mark.parametrize(("labels", "j", "value"), [([1, 5, 2], 1, 5), ([1, 4, 7], 2, 7), ([-1, 0, 2], 0, -1)])
def test_from_list_label_out_of_range(labels, j, value):
    targets = _targets()
    targets[2]["labels"] = torch.tensor(labels)
    with pytest.raises(ValueError, match=rf"targets\[2\]\['labels'\]\[{j}\] = {value} is out of range.*"
                                         r"num_classes=5"):
        TargetBatch.from_list(targets, num_images=3, num_classes=5)


def test_from_list_label_at_upper_bound_is_valid():
    targets = _targets()
    targets[2]["labels"] = torch.tensor([4, 4, 0])
    assert TargetBatch.from_list(targets, num_images=3, num_classes=5).labels[2].tolist() == [4, 4, 0]


def test_detections_fields():
    d = Detections(torch.zeros(2, 4), torch.ones(2), torch.tensor([1, 0]))
    assert d.boxes.shape == (2, 4) and d.scores.tolist() == [1.0, 1.0] and d.labels.tolist() == [1, 0]
