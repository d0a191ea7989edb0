"""cvzoo.heads.classification and cvzoo.heads.pooling against manual pool + linear computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cvzoo.heads import ClassificationHead, ClassificationOutput, GlobalPool


def _feats() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 4, 9, 11, generator=g), torch.randn(2, 6, 5, 7, generator=g)]


def test_classification_head_reads_last_map_and_equals_mean_pool_plus_linear():
    torch.manual_seed(0)
    head = ClassificationHead(6, 3).eval()
    feats = _feats()
    out = head(feats)
    assert isinstance(out, ClassificationOutput)
    assert out.logits.shape == (2, 3)
    x = feats[-1]
    pooled = x.sum(dim=(2, 3)) / (x.shape[2] * x.shape[3])
    ref = pooled @ head.fc.weight.T + head.fc.bias
    torch.testing.assert_close(out.logits, ref)


def test_classification_head_in_index_picks_the_map():
    torch.manual_seed(0)
    head = ClassificationHead(4, 5, in_index=0).eval()
    feats = _feats()
    ref = F.linear(F.adaptive_avg_pool2d(feats[0], 1).flatten(1), head.fc.weight, head.fc.bias)
    torch.testing.assert_close(head(feats).logits, ref)


def test_classification_head_accepts_a_single_tensor():
    torch.manual_seed(0)
    head = ClassificationHead(6, 3).eval()
    feats = _feats()
    torch.testing.assert_close(head(feats[-1]).logits, head(feats).logits)


@pytest.mark.parametrize("pool", ["avg", "max", "avgmax"])
def test_pool_closed_forms(pool):
    x = _feats()[-1]
    avg = F.adaptive_avg_pool2d(x, 1).flatten(1)
    mx = F.adaptive_max_pool2d(x, 1).flatten(1)
    ref = {"avg": avg, "max": mx, "avgmax": 0.5 * (avg + mx)}[pool]
    torch.testing.assert_close(GlobalPool(pool)(x), ref)
    torch.manual_seed(0)
    head = ClassificationHead(6, 3, pool=pool).eval()
    torch.testing.assert_close(head(_feats()).logits, F.linear(ref, head.fc.weight, head.fc.bias))


def test_dropout_acts_only_in_training():
    torch.manual_seed(0)
    head = ClassificationHead(6, 3, dropout=0.5)
    feats = [torch.randn(64, 6, 3, 3)]
    head.eval()
    ref = F.linear(feats[0].mean(dim=(2, 3)), head.fc.weight, head.fc.bias)
    torch.testing.assert_close(head(feats).logits, ref)
    head.train()
    assert not torch.allclose(head(feats).logits, ref)


def test_classification_head_backward_reaches_every_parameter():
    head = ClassificationHead(6, 3)
    head(_feats()).logits.square().sum().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        (dict(in_channels=0), "in_channels"),
        (dict(num_classes=0), "num_classes"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(pool="median"), "pool"),
    ],
)
def test_classification_head_rejects_bad_args(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        ClassificationHead(**{"in_channels": 6, "num_classes": 3, **kwargs})


def test_global_pool_rejects_unknown_pool_and_names_the_value():
    with pytest.raises(ValueError, match="pool") as err:
        GlobalPool("gem")
    assert "'gem'" in str(err.value)
