import pytest
import torch
import torch.nn.functional as F

from cvzoo.adapt import ProtoNet, class_prototypes, episode_labels, prototype_logits
from cvzoo.backbones import resnet_micro

pytestmark = pytest.mark.usefixtures("one_thread")


def test_prototypes_are_per_class_means_in_any_order():
    support = torch.randn(7, 4)
    labels = torch.tensor([2, 0, 1, 2, 0, 2, 1])
    expected = torch.stack([support[labels == c].mean(0) for c in range(3)])
    assert torch.allclose(class_prototypes(support, labels, 3), expected, atol=1e-6)


def test_logits_are_negative_squared_distances_or_scaled_cosines():
    q, p = torch.randn(5, 3), torch.randn(4, 3)
    expected = -torch.stack([((qi - p) ** 2).sum(-1) for qi in q])
    assert torch.allclose(prototype_logits(q, p), expected, atol=1e-5)
    cosine = torch.stack([F.cosine_similarity(qi[None], p) for qi in q])
    assert torch.allclose(prototype_logits(q, p, "cosine", scale=3.0), 3.0 * cosine, atol=1e-5)
    with pytest.raises(ValueError, match="distance"):
        prototype_logits(q, p, "manhattan")


def _model(**kwargs):
    return ProtoNet(resnet_micro(in_channels=1, out_indices=(3,)), n_way=3, k_shot=2, query=2, **kwargs).eval()


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_episode_loss_equals_the_closed_form(distance):
    model = _model(distance=distance, scale=5.0)
    images = torch.randn(2 * 12, 1, 32, 32)
    labels = episode_labels(3, 2, 2, tasks=2)
    out = model.loss(images, labels)
    emb = model(images).view(2, 12, -1)
    losses, correct = [], []
    for t in range(2):  # the reference: one task at a time, prototypes as class means
        protos = class_prototypes(emb[t, :6], labels[:6], 3)
        logits = prototype_logits(emb[t, 6:], protos, distance, 5.0)
        losses.append(F.cross_entropy(logits, labels[6:12]))
        correct.append((logits.argmax(-1) == labels[6:12]).float().mean())
    assert torch.allclose(out["loss"], torch.stack(losses).mean(), atol=1e-4)
    assert torch.allclose(out["accuracy"], torch.stack(correct).mean())


def test_predict_uses_the_support_set():
    model = _model()
    support = torch.randn(6, 1, 32, 32)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    # queries equal to support images land on their own class (distance to own prototype is smallest here
    # because each class's two shots are the same image)
    support[1], support[3], support[5] = support[0], support[2], support[4]
    assert model.predict(support, labels, support[[0, 2, 4]]).tolist() == [0, 1, 2]


def test_loss_compiles_without_graph_breaks():
    model = _model().train()
    images, labels = torch.randn(12, 1, 32, 32), episode_labels(3, 2, 2)
    compiled = torch.compile(model.loss, backend="eager", fullgraph=True)
    model.eval()
    assert torch.allclose(compiled(images, labels)["loss"], model.loss(images, labels)["loss"], atol=1e-5)


def test_bad_episodes_raise():
    model = _model()
    with pytest.raises(ValueError, match="episodic batches"):
        model.loss(torch.randn(10, 1, 32, 32), torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="episode layout"):
        model.loss(torch.randn(12, 1, 32, 32), episode_labels(3, 2, 2).flip(0))
    with pytest.raises(ValueError, match="distance"):
        _model(distance="l1")
    with pytest.raises(ValueError, match="backbone"):
        ProtoNet(torch.nn.Linear(2, 2))


def test_flattened_embeddings_keep_the_spatial_layout():
    backbone = resnet_micro(in_channels=1, out_indices=(1,))
    model = ProtoNet(backbone, n_way=3, k_shot=2, query=2, pool="flatten").eval()
    images = torch.randn(12, 1, 32, 32)
    assert torch.equal(model(images), backbone(images)[-1].flatten(1))  # (12, 32 * 4 * 4)
    assert model.embedding_dim is None and torch.isfinite(model.loss(images, episode_labels(3, 2, 2))["loss"])
    with pytest.raises(ValueError, match="pool"):
        ProtoNet(backbone, pool="max")
    with pytest.raises(ValueError, match="embedding_dim"):
        ProtoNet(backbone, pool="flatten", embedding_dim=8)
