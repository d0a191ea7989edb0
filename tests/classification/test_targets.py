"""cvzoo.classification.targets: validation of image-level targets at the public boundary."""

from __future__ import annotations

import pytest
import torch

from cvzoo.classification.targets import check_class_targets, check_value_targets


def test_class_indices_pass_through():
    y = torch.tensor([0, 2, 1])
    assert torch.equal(check_class_targets(y, 3, 3), y)


def test_class_probabilities_pass_through():
    p = torch.tensor([[0.2, 0.8], [1.0, 0.0]])
    assert torch.equal(check_class_targets(p, 2, 2), p)


def test_empty_batch_of_indices_is_not_range_checked():
    assert check_class_targets(torch.zeros(0, dtype=torch.long), 0, 3).shape == (0,)


@pytest.mark.parametrize("labels, fragment", [
    (torch.tensor([0, 3]), "[0, 3)"),
    (torch.tensor([-2, 1]), "-2"),
    (torch.tensor([0, 1, 1]), "(2,)"),
    (torch.tensor([0.0, 1.0]), "(2, 3)"),
    (torch.tensor([True, False]), "torch.bool"),
    (torch.tensor([1 + 0j, 0j]), "complex"),
    ((0, 1), "tuple"),
])
def test_class_targets_rejected_with_name_and_value(labels, fragment):
    with pytest.raises(ValueError, match="^gt") as err:
        check_class_targets(labels, 2, 3, name="gt")
    assert fragment in str(err.value)


def test_value_targets_single_output_reshaped():
    v = torch.tensor([0.5, 1.5])
    out = check_value_targets(v, (2, 1), "v")
    assert out.shape == (2, 1)
    assert torch.equal(out[:, 0], v)


@pytest.mark.parametrize("values, fragment", [
    (torch.rand(3, 1), "(3, 1)"),
    (torch.rand(2, 2), "(2, 2)"),
    (torch.rand(0), "(0,)"),
    (torch.tensor([1, 2]), "torch.int64"),
    (torch.tensor([float("inf"), 0.0]), "NaN or inf"),
    ([0.1, 0.2], "list"),
])
def test_value_targets_rejected_with_name_and_value(values, fragment):
    with pytest.raises(ValueError, match="^targets\\['v'\\]") as err:
        check_value_targets(values, (2, 1), "targets['v']")
    assert fragment in str(err.value)
