"""cvzoo.classification.classifier.ImageClassifier: loss and predict against hand-computed references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cvzoo.backbones import resnet_micro
from cvzoo.classification import ClassificationPrediction, ImageClassifier
from cvzoo.heads import ClassificationHead, ClassificationOutput, RegressionHead
from cvzoo.necks import FPN
from cvzoo.zoo import create_model

K = 3


def _model(num_classes: int = K, **kwargs) -> ImageClassifier:
    torch.manual_seed(0)
    backbone = resnet_micro(out_indices=(3,))
    head = ClassificationHead(backbone.feature_info[-1].channels, num_classes)
    return ImageClassifier(backbone, head, **kwargs).eval()


def _images(b: int = 2, h: int = 40, w: int = 48) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(1))


def _nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logp = logits - logits.logsumexp(dim=1, keepdim=True)
    return -logp[torch.arange(len(labels)), labels].mean()


def test_forward_returns_head_output_and_signature():
    model = _model()
    out = model(_images())
    assert isinstance(out, ClassificationOutput)
    assert out.logits.shape == (2, K)
    assert model.num_classes == K
    assert model.signature.outputs == ("logits",)
    assert model.signature.in_channels == 3 and model.signature.min_size == 32


def test_loss_equals_cross_entropy_by_hand():
    model = _model()
    x, y = _images(), torch.tensor([2, 0])
    losses = model.loss(x, y)
    assert set(losses) == {"loss"} and losses["loss"].ndim == 0
    torch.testing.assert_close(losses["loss"], _nll(model(x).logits, y))


def test_loss_with_label_smoothing_by_hand():
    model = _model(label_smoothing=0.2)
    x, y = _images(), torch.tensor([1, 2])
    logits = model(x).logits
    logp = logits.log_softmax(dim=1)
    ref = (0.8 * -logp[torch.arange(2), y] + 0.2 * -logp.mean(dim=1)).mean()
    torch.testing.assert_close(model.loss(x, y)["loss"], ref)


def test_soft_labels_are_class_probabilities():
    model = _model()
    x = _images()
    probs = torch.tensor([[0.2, 0.5, 0.3], [1.0, 0.0, 0.0]])
    logits = model(x).logits
    ref = -(probs * (logits - logits.logsumexp(dim=1, keepdim=True))).sum(dim=1).mean()
    torch.testing.assert_close(model.loss(x, probs)["loss"], ref)
    # one-hot probabilities give the same loss as indices
    onehot = F.one_hot(torch.tensor([1, 0]), K).float()
    torch.testing.assert_close(model.loss(x, onehot)["loss"], model.loss(x, torch.tensor([1, 0]))["loss"])


def test_loss_backward_reaches_every_parameter():
    model = _model().train()
    model.loss(_images(4), torch.tensor([0, 1, 2, 1]))["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_predict_consistent_with_softmax():
    model = _model()
    x = _images(4)
    pred = model.predict(x)
    assert isinstance(pred, ClassificationPrediction)
    logits = model(x).logits
    probs = logits.exp() / logits.exp().sum(dim=1, keepdim=True)
    torch.testing.assert_close(pred.probs, probs)
    torch.testing.assert_close(pred.probs.sum(dim=1), torch.ones(4))
    assert torch.equal(pred.labels, probs.argmax(dim=1))
    torch.testing.assert_close(pred.scores, probs.gather(1, pred.labels[:, None])[:, 0])
    assert pred.labels.shape == (4,) and pred.scores.shape == (4,) and pred.probs.shape == (4, K)
    assert not pred.probs.requires_grad


def test_zoo_classifier_builds_and_predicts():
    model = create_model("resnet_micro_classifier", num_classes=5).eval()
    assert isinstance(model, ImageClassifier) and model.num_classes == 5
    pred = model.predict(_images())
    assert pred.probs.shape == (2, 5)


def test_classifier_with_neck():
    torch.manual_seed(0)
    backbone = resnet_micro()
    neck = FPN(backbone.feature_info, 8)
    model = ImageClassifier(backbone, ClassificationHead(8, K), neck=neck).eval()
    x = _images()
    torch.testing.assert_close(model(x).logits, model.head(neck(backbone(x))).logits)
    assert model.loss(x, torch.tensor([0, 1]))["loss"].ndim == 0


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_integer_labels_of_any_width_give_the_same_loss(dtype):
    # validation accepts every integer dtype, so cross entropy must not then fail on a non-int64 target
    model = _model()
    x, y = _images(), torch.tensor([2, 0])
    torch.testing.assert_close(model.loss(x, y.to(dtype))["loss"], model.loss(x, y)["loss"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_other_float_image_dtypes_work_or_raise_value_error(dtype):
    # a float32 model given float64/float16 images: either handled, or a ValueError naming images (design rule 8),
    # never a RuntimeError from deep inside conv2d
    model = _model()
    x, y = _images().to(dtype), torch.tensor([2, 0])
    for call in (lambda: model.loss(x, y)["loss"], lambda: model.predict(x).probs):
        try:
            out = call()
        except ValueError as err:
            assert "images" in str(err) and str(dtype) in str(err)
        else:
            assert torch.isfinite(out).all()


# bad images: (make from a good batch, fragment the message must contain)
BAD_IMAGES = {
    "not-a-tensor": (lambda x: x.numpy(), "ndarray"),
    "3-d": (lambda x: x[0], "4-D"),
    "empty-batch": (lambda x: x[:0], "empty"),
    "wrong-channels": (lambda x: x[:, :1], "channels"),
    "integer-dtype": (lambda x: (x.clamp(0, 1) * 255).to(torch.uint8), "torch.uint8"),
    "too-small": (lambda x: x[:, :, :16, :16], "16x16"),
    "nan": (lambda x: x.index_put((torch.tensor([1]),), torch.tensor(float("nan"))), "NaN"),
    "inf": (lambda x: x.index_put((torch.tensor([0]),), torch.tensor(float("inf"))), "inf"),
}


@pytest.mark.parametrize("method", ["loss", "predict"])
@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_images_raise_value_error(case, method):
    model = _model()
    make, fragment = BAD_IMAGES[case]
    bad = make(_images())
    with pytest.raises(ValueError, match="images") as err:
        model.loss(bad, torch.tensor([0, 1])) if method == "loss" else model.predict(bad)
    assert fragment in str(err.value)


@pytest.mark.parametrize("method", ["loss", "predict"])
def test_size_divisor_is_enforced(method):
    model = _model()
    model.signature = model.signature.replace(size_divisor=32)
    bad = _images(2, 64, 48)
    with pytest.raises(ValueError, match="size_divisor"):
        model.loss(bad, torch.tensor([0, 1])) if method == "loss" else model.predict(bad)


BAD_LABELS = {
    "too-long": (torch.tensor([0, 1, 2]), "shape"),
    "column": (torch.tensor([[0], [1]]), "shape"),
    "too-large": (torch.tensor([0, K]), str(K)),
    "negative": (torch.tensor([-1, 0]), "-1"),
    "float-wrong-shape": (torch.tensor([0.0, 1.0]), "shape"),
    "float-wrong-classes": (torch.full((2, K + 1), 0.25), "shape"),
    "float-nan": (torch.tensor([[float("nan"), 0.5, 0.5], [1.0, 0.0, 0.0]]), "NaN"),
    "list": ([0, 1], "list"),
    "bool": (torch.tensor([True, False]), "torch.bool"),
}


@pytest.mark.parametrize("case", list(BAD_LABELS))
def test_bad_labels_raise_value_error_naming_labels(case):
    labels, fragment = BAD_LABELS[case]
    with pytest.raises(ValueError, match="labels") as err:
        _model().loss(_images(), labels)
    assert fragment in str(err.value)


@pytest.mark.parametrize("kwargs, arg", [
    (dict(label_smoothing=1.0), "label_smoothing"),
    (dict(label_smoothing=-0.1), "label_smoothing"),
])
def test_constructor_rejects_bad_args(kwargs, arg):
    backbone = resnet_micro(out_indices=(3,))
    with pytest.raises(ValueError, match=arg):
        ImageClassifier(backbone, ClassificationHead(128, 2), **kwargs)


def test_constructor_rejects_non_classification_head():
    backbone = resnet_micro(out_indices=(3,))
    with pytest.raises(ValueError, match="head"):
        ImageClassifier(backbone, RegressionHead(128, 2))


def test_tiny_classifier_overfits_a_fixed_batch():
    torch.manual_seed(0)
    model = create_model("resnet_micro_classifier", num_classes=2).train()
    x = torch.randn(8, 3, 32, 32)
    y = torch.tensor([0, 1] * 4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = model.loss(x, y)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses
    assert losses[-1] < 0.2, losses


def test_compiled_loss_matches_eager():
    torch._dynamo.reset()
    model = _model()
    x, y = _images(), torch.tensor([2, 0])
    eager = model.loss(x, y)["loss"]
    compiled = torch.compile(model.loss, backend="eager", fullgraph=True)(x, y)["loss"]
    torch.testing.assert_close(compiled, eager)
    # and with soft labels, and gradients flow through the compiled loss
    probs = torch.tensor([[0.2, 0.5, 0.3], [0.0, 0.0, 1.0]])
    compiled_soft = torch.compile(model.loss, backend="eager", fullgraph=True)(x, probs)["loss"]
    torch.testing.assert_close(compiled_soft, model.loss(x, probs)["loss"])
    compiled_soft.backward()
    assert model.head.fc.weight.grad is not None
