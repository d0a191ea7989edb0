import pytest
import torch
import torch.nn.functional as F

from cvzoo.adapt import DANN
from cvzoo.adapt._checks import pooled_features
from cvzoo.backbones import resnet_micro

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(**kwargs):
    torch.manual_seed(0)
    return DANN(resnet_micro(in_channels=3, out_indices=(3,)), num_classes=4, num_domains=3, hidden_dim=16,
                **kwargs)


def _batch():
    return torch.randn(6, 3, 32, 32), {"label": torch.tensor([0, 1, 2, 3, -1, -1]),
                                       "domain": torch.tensor([0, 1, 2, 0, 1, 2])}


def test_loss_terms_equal_their_definitions():
    model = _model(adversary_weight=0.5).eval()  # eval: BatchNorm statistics fixed, no schedule step
    images, targets = _batch()
    out = model.loss(images, targets)
    raw = model(images)
    labelled = targets["label"] >= 0
    classification = F.cross_entropy(raw.logits[labelled], targets["label"][labelled])  # unlabelled rows ignored
    adversary = F.cross_entropy(raw.adversary_logits, targets["domain"])
    assert torch.allclose(out["classification"], classification, atol=1e-6)
    assert torch.allclose(out["adversary"], adversary, atol=1e-6)
    assert torch.allclose(out["loss"], classification + 0.5 * adversary, atol=1e-6)
    assert out["adversary_accuracy"] == (raw.adversary_logits.argmax(-1) == targets["domain"]).float().mean()


def _backbone_grads(model, loss):
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.backbone.parameters()])


def _reference_classification(model, images, targets):
    """Pooled features and the cross-entropy of the labelled images, computed by hand."""
    feats = pooled_features(model.backbone, images)
    labelled = targets["label"] >= 0
    return feats, F.cross_entropy(model.classifier(feats)[labelled], targets["label"][labelled])


def test_features_receive_the_reversed_adversary_gradient():
    images, targets = _batch()
    model = _model(reversal=0.7).eval()
    got = _backbone_grads(model, model.loss(images, targets)["loss"])
    # reference, without the reversal layer: d(classification)/dθ - 0.7 * d(adversary)/dθ
    feats, classification = _reference_classification(model, images, targets)
    g_cls = torch.autograd.grad(classification, list(model.backbone.parameters()), retain_graph=True)
    adversary = F.cross_entropy(model.adversary(feats), targets["domain"])
    g_adv = torch.autograd.grad(adversary, list(model.backbone.parameters()))
    expected = torch.cat([(c - 0.7 * a).flatten() for c, a in zip(g_cls, g_adv)])
    assert torch.allclose(got, expected, atol=1e-6)


def test_reversal_zero_is_the_plain_model_with_a_probe():
    images, targets = _batch()
    model = _model(reversal=0.0).eval()
    got = _backbone_grads(model, model.loss(images, targets)["loss"])
    _, classification = _reference_classification(model, images, targets)
    expected = torch.cat([g.flatten() for g in torch.autograd.grad(classification, list(model.backbone.parameters()))])
    assert torch.allclose(got, expected, atol=1e-6)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.adversary.parameters())


def test_loss_compiles_without_graph_breaks():
    model = _model(schedule_steps=100).eval()
    images, targets = _batch()
    compiled = torch.compile(model.loss, backend="eager", fullgraph=True)
    assert torch.allclose(compiled(images, targets)["loss"], model.loss(images, targets)["loss"], atol=1e-5)


def test_training_advances_the_schedule_and_predict_returns_labels():
    model = _model(schedule_steps=10).train()
    images, targets = _batch()
    model.loss(images, targets)
    assert int(model.reversal.step) == 1
    assert model.eval().predict(images).labels.shape == (6,)


@pytest.mark.parametrize("targets, match", [
    ({"label": torch.zeros(6, dtype=torch.long)}, "'domain'"),
    ({"label": torch.zeros(5, dtype=torch.long), "domain": torch.zeros(6, dtype=torch.long)}, "shape \\(6,\\)"),
    ({"label": torch.full((6,), 4), "domain": torch.zeros(6, dtype=torch.long)}, "outside \\[-1, 3\\]"),
    ({"label": torch.zeros(6, dtype=torch.long), "domain": torch.full((6,), -1)}, "outside \\[0, 2\\]"),
    (torch.zeros(6, dtype=torch.long), "must be a dict"),
])
def test_bad_targets_raise(targets, match):
    with pytest.raises(ValueError, match=match):
        _model().loss(torch.randn(6, 3, 32, 32), targets)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="num_domains"):
        DANN(resnet_micro(out_indices=(3,)), 4, 1)
    with pytest.raises(ValueError, match="adversary_target"):
        DANN(resnet_micro(out_indices=(3,)), 4, 2, adversary_target="label")
