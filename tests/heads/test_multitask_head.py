"""cvzoo.heads.multitask.MultiTaskHead: named heads on one set of maps."""

from __future__ import annotations

import pytest
import torch

from cvzoo.heads import (
    ClassificationHead,
    ClassificationOutput,
    KeypointOutput,
    KeypointRegressionHead,
    MultiTaskHead,
    RegressionHead,
    RegressionOutput,
)


def test_multitask_head_returns_each_heads_output_by_name():
    torch.manual_seed(0)
    heads = {
        "label": ClassificationHead(6, 3),
        "value": RegressionHead(6, 1, value_range=(0.0, 5.0)),
        "corners": KeypointRegressionHead(6, 4, hidden=8),
    }
    mt = MultiTaskHead(heads).eval()
    feats = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)]
    out = mt(feats)
    assert isinstance(out, dict)
    assert list(out) == ["label", "value", "corners"]
    assert isinstance(out["label"], ClassificationOutput) and out["label"].logits.shape == (2, 3)
    assert isinstance(out["value"], RegressionOutput) and out["value"].values.shape == (2, 1)
    assert isinstance(out["corners"], KeypointOutput) and out["corners"].points.shape == (2, 4, 2)
    for name, head in heads.items():
        torch.testing.assert_close(out[name][0], head(feats)[0])


@pytest.mark.parametrize("heads", [{}, {"not-an-identifier": None}, {"2d": None}, {3: None}])
def test_multitask_head_rejects_bad_heads(heads):
    heads = {k: ClassificationHead(4, 2) for k in heads}
    with pytest.raises(ValueError, match="head"):
        MultiTaskHead(heads)
