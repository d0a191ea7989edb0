import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier

from cvzoo.ssl.evaluate import knn_accuracy, linear_probe_accuracy


def _blobs(n, seed, shift=2.0, dim=8, classes=4):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * shift
    return centres[labels] + torch.randn(n, dim, generator=g), labels


def test_unweighted_knn_equals_sklearn_cosine_knn():
    x, y = _blobs(300, 0, shift=1.0)
    xt, yt = _blobs(200, 1, shift=1.0)
    for k in (1, 5):
        ref = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(x.numpy(), y.numpy())
        expected = float((ref.predict(xt.numpy()) == yt.numpy()).mean())
        assert knn_accuracy(x, y, xt, yt, k=k, temperature=None, chunk_size=37) == pytest.approx(expected)


def test_weighted_knn_equals_a_hand_vote():
    x, y = _blobs(50, 2, shift=0.5)
    xt, yt = _blobs(20, 3, shift=0.5)
    xn, xtn = x / x.norm(dim=1, keepdim=True), xt / xt.norm(dim=1, keepdim=True)
    hits = 0
    for q in range(20):
        sim = xtn[q] @ xn.T
        top = sim.argsort(descending=True)[:7]
        votes = np.zeros(4)
        for i in top.tolist():
            votes[int(y[i])] += float(torch.exp(sim[i] / 0.1))
        hits += int(votes.argmax() == int(yt[q]))
    assert knn_accuracy(x, y, xt, yt, k=7, temperature=0.1) == pytest.approx(hits / 20)


def test_linear_probe_matches_sklearn_logistic_regression_on_separable_blobs():
    x, y = _blobs(400, 4)
    xt, yt = _blobs(300, 5)
    ours = linear_probe_accuracy(x, y, xt, yt)
    ref = LogisticRegression(max_iter=1000).fit(x.numpy(), y.numpy())
    expected = float((ref.predict(xt.numpy()) == yt.numpy()).mean())
    assert expected > 0.8 and abs(ours - expected) <= 0.02
    noise_train, noise_test = _blobs(400, 6, shift=0.0)[0], _blobs(300, 7, shift=0.0)[0]
    assert linear_probe_accuracy(noise_train, y, noise_test, yt) < 0.45  # features without signal: near chance


def test_validation():
    x, y = _blobs(10, 0)
    with pytest.raises(ValueError, match="k must be an int in \\[1, 10\\]"):
        knn_accuracy(x, y, x, y, k=11)
    with pytest.raises(ValueError, match="train_labels must be an integer \\(10,\\) tensor"):
        knn_accuracy(x, y.float(), x, y)
    with pytest.raises(ValueError, match="differ in dimension"):
        knn_accuracy(x, y, x[:, :3], y)
    with pytest.raises(ValueError, match="epochs must be an int >= 1"):
        linear_probe_accuracy(x, y, x, y, epochs=0)


def test_leave_one_out_excludes_each_query_from_its_neighbours():
    x, y = _blobs(120, 8, shift=1.0)
    ref = KNeighborsClassifier(n_neighbors=1, metric="cosine", algorithm="brute").fit(x.numpy(), y.numpy())
    neighbour = ref.kneighbors(x.numpy(), n_neighbors=2, return_distance=False)[:, 1]  # [:, 0] is the query
    expected = float((y.numpy()[neighbour] == y.numpy()).mean())
    assert knn_accuracy(x, y, x, y, k=1, temperature=None, chunk_size=50) == pytest.approx(expected)
    assert knn_accuracy(x, y, x.clone(), y, k=1, temperature=None) == 1.0  # not the same tensor: self included
