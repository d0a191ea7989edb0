"""cvzoo.classification.multitask.MultiTaskModel: weighted sum of per-task losses recomputed by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cvzoo.backbones import resnet_micro
from cvzoo.classification import ClassificationPrediction, MultiTaskModel
from cvzoo.heads import ClassificationHead, MultiTaskHead, RegressionHead
from cvzoo.zoo import create_model

K, P = 3, 2  # classes, keypoints
WEIGHTS = {"label": 1.0, "value": 2.5, "keypoints": 0.5}


def _model(**kwargs) -> MultiTaskModel:
    torch.manual_seed(0)
    kwargs.setdefault("loss_weights", WEIGHTS)
    return create_model("resnet_micro_multitask", num_classes=K, num_keypoints=P, value_range=(0.0, 4.0),
                        **kwargs).eval()


def _images(b: int = 2) -> torch.Tensor:
    return torch.randn(b, 3, 40, 48, generator=torch.Generator().manual_seed(1))


def _targets(b: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {
        "label": torch.arange(b) % K,
        "value": 4 * torch.rand(b, generator=g),  # (B,) is accepted for a single output
        "keypoints": torch.rand(b, P, 2, generator=g),
    }


def _smooth_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    d = (pred - target).abs()
    return torch.where(d < 1.0, 0.5 * d**2, d - 0.5).mean()


def test_zoo_multitask_structure():
    model = _model()
    assert model.tasks == ["label", "value", "keypoints"]
    assert model.signature.outputs == ("label", "value", "keypoints")
    assert model.loss_weights == WEIGHTS
    out = model(_images())
    assert set(out) == set(model.tasks)
    assert out["label"].logits.shape == (2, K)
    assert out["value"].values.shape == (2, 1)
    assert out["keypoints"].points.shape == (2, P, 2)


def test_total_loss_is_weighted_sum_of_losses_by_hand():
    model = _model()
    x, t = _images(), _targets()
    losses = model.loss(x, t)
    assert set(losses) == {"loss", "label", "value", "keypoints"}
    out = model(x)
    logits = out["label"].logits
    ce = -(logits.log_softmax(dim=1)[torch.arange(2), t["label"]]).mean()
    sl1 = _smooth_l1(out["value"].values, t["value"][:, None])
    l1 = (out["keypoints"].points - t["keypoints"]).abs().mean()
    torch.testing.assert_close(losses["label"], ce)
    torch.testing.assert_close(losses["value"], sl1)
    torch.testing.assert_close(losses["keypoints"], l1)
    torch.testing.assert_close(losses["loss"], 1.0 * ce + 2.5 * sl1 + 0.5 * l1)


def test_smooth_l1_exercises_both_branches():
    # value targets far from the bounded prediction exercise the linear part of smooth L1
    torch.manual_seed(0)
    backbone = resnet_micro(out_indices=(3,))
    head = MultiTaskHead({"value": RegressionHead(128, 2)})
    model = MultiTaskModel(backbone, head).eval()
    x = _images()
    target = torch.tensor([[5.0, 0.1], [-3.0, 0.0]])
    pred = model(x)["value"].values
    torch.testing.assert_close(model.loss(x, {"value": target})["value"], _smooth_l1(pred, target))


def test_default_weights_are_one():
    model = _model(loss_weights=None)
    losses = model.loss(_images(), _targets())
    torch.testing.assert_close(losses["loss"], losses["label"] + losses["value"] + losses["keypoints"])


def test_loss_fns_override():
    torch.manual_seed(0)
    backbone = resnet_micro(out_indices=(3,))
    head = MultiTaskHead({"cls": ClassificationHead(128, K), "reg": RegressionHead(128, 2)})
    model = MultiTaskModel(backbone, head, loss_fns={"reg": F.mse_loss}, loss_weights={"cls": 0.0}).eval()
    x = _images()
    t = {"cls": torch.tensor([0, 2]), "reg": torch.randn(2, 2)}
    losses = model.loss(x, t)
    mse = (model(x)["reg"].values - t["reg"]).square().mean()
    torch.testing.assert_close(losses["reg"], mse)
    torch.testing.assert_close(losses["loss"], mse)  # cls weighted by 0


def test_soft_labels_for_classification_task():
    model = _model()
    x, t = _images(), _targets()
    t["label"] = torch.tensor([[0.5, 0.5, 0.0], [0.1, 0.1, 0.8]])
    logits = model(x).get("label").logits
    ref = -(t["label"] * logits.log_softmax(dim=1)).sum(dim=1).mean()
    torch.testing.assert_close(model.loss(x, t)["label"], ref)


def test_backward_reaches_every_parameter():
    model = _model().train()
    model.loss(_images(), _targets())["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_predict():
    model = _model()
    x = _images()
    pred = model.predict(x)
    assert set(pred) == set(model.tasks)
    assert isinstance(pred["label"], ClassificationPrediction)
    out = model(x)
    torch.testing.assert_close(pred["label"].probs, out["label"].logits.softmax(dim=1))
    assert torch.equal(pred["label"].labels, out["label"].logits.argmax(dim=1))
    torch.testing.assert_close(pred["value"], out["value"].values)
    assert bool((pred["value"] >= 0).all()) and bool((pred["value"] <= 4).all())
    assert pred["keypoints"].shape == (2, P, 2)
    assert bool((pred["keypoints"] >= 0).all()) and bool((pred["keypoints"] <= 1).all())


@pytest.mark.parametrize("change, fragment", [
    (lambda t: t.pop("value"), "missing ['value']"),
    (lambda t: t.update(extra=torch.zeros(2)), "unknown ['extra']"),
    (lambda t: (t.pop("label"), t.update(labels=torch.zeros(2, dtype=torch.long))), "missing ['label']"),
])
def test_missing_or_unknown_task_keys_raise(change, fragment):
    t = _targets()
    change(t)
    with pytest.raises(ValueError, match="targets") as err:
        _model().loss(_images(), t)
    assert fragment in str(err.value)


def test_transposed_keypoints_are_rejected_not_silently_reshaped():
    # (B, 2, K) holds the same number of values as (B, K, 2) but in another layout: reshaping it scrambles x and y
    torch.manual_seed(0)
    model = create_model("resnet_micro_multitask", num_classes=K, num_keypoints=3).eval()
    t = _targets()
    t["keypoints"] = torch.rand(2, 3, 2).transpose(1, 2)  # (B, 2, K)
    with pytest.raises(ValueError, match=r"targets\['keypoints'\]"):
        model.loss(_images(), t)


def test_targets_must_be_a_mapping():
    with pytest.raises(ValueError, match="targets"):
        _model().loss(_images(), [torch.zeros(2)])


BAD_TASK_TARGETS = {
    "label-out-of-range": ("label", torch.tensor([0, K]), "targets['label']"),
    "label-wrong-shape": ("label", torch.tensor([0, 1, 2]), "targets['label']"),
    "label-not-tensor": ("label", [0, 1], "targets['label']"),
    "value-wrong-shape": ("value", torch.rand(2, 3), "targets['value']"),
    "value-integer": ("value", torch.tensor([1, 2]), "targets['value']"),
    "value-nan": ("value", torch.tensor([0.5, float("nan")]), "targets['value']"),
    "keypoints-wrong-shape": ("keypoints", torch.rand(2, P + 1, 2), "targets['keypoints']"),
    "keypoints-empty": ("keypoints", torch.rand(0, P, 2), "targets['keypoints']"),
    "keypoints-not-tensor": ("keypoints", 0.5, "targets['keypoints']"),
}


@pytest.mark.parametrize("case", list(BAD_TASK_TARGETS))
def test_bad_task_targets_raise_naming_the_task(case):
    task, value, fragment = BAD_TASK_TARGETS[case]
    t = _targets()
    t[task] = value
    with pytest.raises(ValueError) as err:
        _model().loss(_images(), t)
    assert fragment in str(err.value)


BAD_IMAGES = {
    "not-a-tensor": lambda x: x.tolist(),
    "3-d": lambda x: x[0],
    "empty-batch": lambda x: x[:0],
    "wrong-channels": lambda x: x[:, :2],
    "integer-dtype": lambda x: x.long(),
    "too-small": lambda x: x[:, :, :20],
    "nan": lambda x: x.index_put((torch.tensor([0]),), torch.tensor(float("nan"))),
    "inf": lambda x: x.index_put((torch.tensor([1]),), torch.tensor(float("-inf"))),
}


@pytest.mark.parametrize("method", ["loss", "predict"])
@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_images_raise_value_error(case, method):
    model = _model()
    bad = BAD_IMAGES[case](_images())
    with pytest.raises(ValueError, match="images"):
        model.loss(bad, _targets()) if method == "loss" else model.predict(bad)


def test_size_divisor_through_loss_and_predict():
    model = _model()
    model.signature = model.signature.replace(size_divisor=32)
    with pytest.raises(ValueError, match="size_divisor"):
        model.loss(_images(), _targets())
    with pytest.raises(ValueError, match="size_divisor"):
        model.predict(_images())


def _heads() -> MultiTaskHead:
    return MultiTaskHead({"label": ClassificationHead(128, K), "value": RegressionHead(128, 1)})


@pytest.mark.parametrize("kwargs, fragments", [
    (dict(loss_weights={"colour": 1.0}), ["loss_weights", "colour"]),
    (dict(loss_weights={"label": -1.0}), ["loss_weights", "-1.0"]),
    (dict(loss_weights={"label": float("nan")}), ["loss_weights"]),
    (dict(loss_fns={"colour": F.l1_loss}), ["loss_fns", "colour"]),
])
def test_constructor_rejects_bad_weights_and_loss_fns(kwargs, fragments):
    with pytest.raises(ValueError) as err:
        MultiTaskModel(resnet_micro(out_indices=(3,)), _heads(), **kwargs)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_constructor_rejects_head_that_is_not_multitask():
    with pytest.raises(ValueError, match="head"):
        MultiTaskModel(resnet_micro(out_indices=(3,)), ClassificationHead(128, 2))


def test_constructor_rejects_head_without_default_loss():
    class Custom(nn.Module):
        def forward(self, feats):
            return (feats[-1].mean(dim=(2, 3)),)

    with pytest.raises(ValueError, match="loss_fns"):
        MultiTaskModel(resnet_micro(out_indices=(3,)), MultiTaskHead({"custom": Custom()}))
    # a loss function for it makes it valid
    model = MultiTaskModel(resnet_micro(out_indices=(3,)), MultiTaskHead({"custom": Custom()}),
                           loss_fns={"custom": F.mse_loss})
    assert model.tasks == ["custom"]


def test_compiled_loss_matches_eager():
    torch._dynamo.reset()
    model = _model()
    x, t = _images(), _targets()
    eager = model.loss(x, t)
    compiled = torch.compile(model.loss, backend="eager", fullgraph=True)(x, t)
    assert set(compiled) == set(eager)
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k])
