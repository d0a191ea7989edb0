import math

import pytest
import torch

from cvzoo.ssl.metric_losses import (
    MarginSoftmaxLoss,
    contrastive_loss,
    multi_similarity_loss,
    pairwise_distance,
    triplet_margin_loss,
)

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_distances = pytest.importorskip("pytorch_metric_learning.distances")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pml_reducers = pytest.importorskip("pytorch_metric_learning.reducers")
lmu = pytest.importorskip("pytorch_metric_learning.utils.loss_and_miner_utils")


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n=14, d=5, classes=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)


def _pml_distance(distance):
    if distance == "euclidean":  # PML normalises by default; ours measures the raw vectors
        return pml_distances.LpDistance(normalize_embeddings=False)
    return pml_distances.CosineSimilarity()


def _pml_reducer(reduction):
    return pml_reducers.AvgNonZeroReducer() if reduction == "mean_nonzero" else pml_reducers.MeanReducer()


# brute force, one pair at a time in plain Python --------------------------------------------------------------


def _d(x, y, distance):
    if distance == "euclidean":
        return math.sqrt(sum((a - b) ** 2 for a, b in zip(x, y)))
    dot = sum(a * b for a, b in zip(x, y))
    return 1.0 - dot / (math.sqrt(sum(a * a for a in x)) * math.sqrt(sum(b * b for b in y)))


def _reduce(losses, reduction):
    kept = [v for v in losses if v > 0] if reduction == "mean_nonzero" else losses
    return sum(kept) / len(kept) if kept else 0.0


def _brute_triplet(x, labels, ref, ref_labels, margin, distance, reduction, exclude_self):
    x, ref, labels, ref_labels = x.tolist(), ref.tolist(), labels.tolist(), ref_labels.tolist()
    losses = []
    for a in range(len(x)):
        for p in range(len(ref)):
            if ref_labels[p] != labels[a] or (exclude_self and p == a):
                continue
            for n in range(len(ref)):
                if ref_labels[n] == labels[a]:
                    continue
                losses.append(max(_d(x[a], ref[p], distance) - _d(x[a], ref[n], distance) + margin, 0.0))
    return _reduce(losses, reduction)


def _brute_contrastive(x, labels, ref, ref_labels, pos_margin, neg_margin, distance, reduction, exclude_self):
    x, ref, labels, ref_labels = x.tolist(), ref.tolist(), labels.tolist(), ref_labels.tolist()
    pos, neg = [], []
    for a in range(len(x)):
        for j in range(len(ref)):
            d = _d(x[a], ref[j], distance)
            if ref_labels[j] != labels[a]:
                neg.append(max(neg_margin - d, 0.0))
            elif not (exclude_self and j == a):
                pos.append(max(d - pos_margin, 0.0))
    return _reduce(pos, reduction) + _reduce(neg, reduction)


# triplet margin loss ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("reduction", ["mean_nonzero", "mean"])
def test_triplet_all_triplets_brute_force(distance, reduction):
    x, labels = _data()
    got = triplet_margin_loss(x, labels, margin=0.3, distance=distance, reduction=reduction, chunk_size=3)
    want = _brute_triplet(x, labels, x, labels, 0.3, distance, reduction, exclude_self=True)
    assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12)
    # a separate reference set: anchors from the batch, positives and negatives from the reference
    ref, ref_labels = _data(n=9, seed=1)
    got = triplet_margin_loss(x, labels, margin=0.3, distance=distance, reduction=reduction,
                              ref_embeddings=ref, ref_labels=ref_labels, chunk_size=4)
    want = _brute_triplet(x, labels, ref, ref_labels, 0.3, distance, reduction, exclude_self=False)
    assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("reduction", ["mean_nonzero", "mean"])
def test_triplet_matches_pml(distance, reduction):
    x, labels = _data(n=24, d=6)
    x.requires_grad_(True)
    pml = pml_losses.TripletMarginLoss(margin=0.25, distance=_pml_distance(distance), reducer=_pml_reducer(reduction))
    # all triplets: values and gradients (ours goes through the counted-weights form)
    want = pml(x, labels)
    got = triplet_margin_loss(x, labels, margin=0.25, distance=distance, reduction=reduction, chunk_size=5)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0])
    # given triplets (a random subset, with repeats), through PML's explicit indices tuple
    a, p, n = lmu.get_all_triplets_indices(labels)
    pick = torch.randint(0, a.shape[0], (50,), generator=torch.Generator().manual_seed(3))
    triplets = (a[pick], p[pick], n[pick])
    want = pml(x, labels, triplets)
    got = triplet_margin_loss(x, labels, triplets, margin=0.25, distance=distance, reduction=reduction)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0])
    # labels are not needed with given triplets
    torch.testing.assert_close(triplet_margin_loss(x, None, triplets, margin=0.25, distance=distance,
                                                   reduction=reduction), got)


def test_triplet_with_reference_matches_pml():
    x, labels = _data(n=10)
    ref, ref_labels = _data(n=16, seed=2)
    pml = pml_losses.TripletMarginLoss(margin=0.4, distance=_pml_distance("euclidean"))
    torch.testing.assert_close(
        triplet_margin_loss(x, labels, margin=0.4, ref_embeddings=ref, ref_labels=ref_labels),
        pml(x, labels, ref_emb=ref, ref_labels=ref_labels))


def test_triplet_empty_and_no_violation():
    x, _ = _data(n=6)
    labels = torch.arange(6)  # no positives
    assert triplet_margin_loss(x, labels).item() == 0.0
    empty = (torch.zeros(0, dtype=torch.long),) * 3
    assert triplet_margin_loss(x, labels, empty).item() == 0.0
    assert triplet_margin_loss(x, labels, empty, reduction="mean").item() == 0.0


def test_triplet_compiles_with_given_triplets():
    x, labels = _data(n=16, d=8, dtype=torch.float32)
    a, p, n = lmu.get_all_triplets_indices(labels)
    triplets = (a[:40], p[:40], n[:40])
    compiled = torch.compile(triplet_margin_loss, backend="eager", fullgraph=True)
    for distance in ("euclidean", "cosine"):
        torch.testing.assert_close(compiled(x, labels, triplets, margin=0.3, distance=distance),
                                   triplet_margin_loss(x, labels, triplets, margin=0.3, distance=distance))


def test_pair_losses_and_margin_softmax_compile():
    x, labels = _data(n=16, d=8, dtype=torch.float32)
    for fn in (contrastive_loss, multi_similarity_loss):  # the all-pairs paths, chunked
        torch.testing.assert_close(torch.compile(fn, backend="eager", fullgraph=True)(x, labels, chunk_size=5),
                                   fn(x, labels))
    loss = MarginSoftmaxLoss(4, 8)
    torch.testing.assert_close(torch.compile(loss, backend="eager", fullgraph=True)(x, labels), loss(x, labels))


def test_all_triplet_loss_never_builds_a_cube():
    from torch.utils._python_dispatch import TorchDispatchMode

    class MaxNumel(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.max = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.max = max(self.max, t.numel())
            return out

    n = 128
    x = torch.randn(n, 4, requires_grad=True)
    labels = torch.arange(n) % 4
    with MaxNumel() as counter:
        triplet_margin_loss(x, labels, chunk_size=8).backward()
    assert counter.max <= n * n  # the (B, R) distances; all triplets would be n**3 / 4 * 3 / 4 = 393,216


def test_half_precision_under_autocast():
    x, labels = _data(n=12, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = triplet_margin_loss(x.bfloat16(), labels)
        ms = multi_similarity_loss(x.bfloat16(), labels)
    assert loss.dtype == torch.float32 and ms.dtype == torch.float32
    torch.testing.assert_close(loss, triplet_margin_loss(x.bfloat16().float(), labels))


# contrastive ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("reduction", ["mean_nonzero", "mean"])
def test_contrastive_brute_force(distance, reduction):
    x, labels = _data()
    pos_margin, neg_margin = (0.5, 3.0) if distance == "euclidean" else (0.2, 0.9)
    got = contrastive_loss(x, labels, pos_margin=pos_margin, neg_margin=neg_margin, distance=distance,
                           reduction=reduction, chunk_size=4)
    want = _brute_contrastive(x, labels, x, labels, pos_margin, neg_margin, distance, reduction, True)
    assert got.item() == pytest.approx(want, rel=1e-10)
    ref, ref_labels = _data(n=9, seed=1)
    got = contrastive_loss(x, labels, pos_margin=pos_margin, neg_margin=neg_margin, distance=distance,
                           reduction=reduction, ref_embeddings=ref, ref_labels=ref_labels)
    want = _brute_contrastive(x, labels, ref, ref_labels, pos_margin, neg_margin, distance, reduction, False)
    assert got.item() == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("reduction", ["mean_nonzero", "mean"])
def test_contrastive_matches_pml(distance, reduction):
    x, labels = _data(n=20, d=6)
    x.requires_grad_(True)
    pos_margin, neg_margin = (0.5, 3.0) if distance == "euclidean" else (0.2, 0.9)
    # PML's margins apply to its CosineSimilarity; ours to 1 - similarity
    pml_margins = (pos_margin, neg_margin) if distance == "euclidean" else (1 - pos_margin, 1 - neg_margin)
    pml = pml_losses.ContrastiveLoss(*pml_margins, distance=_pml_distance(distance), reducer=_pml_reducer(reduction))
    kwargs = dict(pos_margin=pos_margin, neg_margin=neg_margin, distance=distance, reduction=reduction)
    want, got = pml(x, labels), contrastive_loss(x, labels, **kwargs)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0])
    a1, p, a2, n = lmu.get_all_pairs_indices(labels)
    pairs = (a1[::2], p[::2], a2[1::3], n[1::3])
    torch.testing.assert_close(contrastive_loss(x, labels, pairs, **kwargs), pml(x, labels, pairs))
    triplets = lmu.get_all_triplets_indices(labels)  # a triplet tuple reads as the pairs (a, p) and (a, n)
    torch.testing.assert_close(contrastive_loss(x, None, triplets, **kwargs), pml(x, labels, triplets))


# multi-similarity -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("epsilon", [0.1, 0.3, None])
def test_multi_similarity_matches_pml(epsilon):
    x, labels = _data(n=24, d=6)
    x.requires_grad_(True)
    pml = pml_losses.MultiSimilarityLoss(alpha=2.0, beta=10.0, base=0.4)
    indices = None if epsilon is None else pml_miners.MultiSimilarityMiner(epsilon)(x, labels)
    want = pml(x, labels, indices)
    got = multi_similarity_loss(x, labels, alpha=2.0, beta=10.0, base=0.4, epsilon=epsilon, chunk_size=5)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0])


def test_multi_similarity_defaults_reference_and_pairs_match_pml():
    x, labels = _data(n=20, d=6, classes=3)
    pml = pml_losses.MultiSimilarityLoss()  # alpha 2, beta 50, base 0.5: the paper's values, as ours
    torch.testing.assert_close(multi_similarity_loss(x, labels),
                               pml(x, labels, pml_miners.MultiSimilarityMiner(0.1)(x, labels)))
    ref, ref_labels = _data(n=15, d=6, classes=3, seed=4)
    mined = pml_miners.MultiSimilarityMiner(0.1)(x, labels, ref, ref_labels)
    torch.testing.assert_close(multi_similarity_loss(x, labels, ref_embeddings=ref, ref_labels=ref_labels),
                               pml(x, labels, mined, ref, ref_labels))
    # given pairs without mining = PML's loss on those pairs
    a1, p, a2, n = lmu.get_all_pairs_indices(labels)
    pairs = (a1[::2], p[::2], a2[::3], n[::3])
    torch.testing.assert_close(multi_similarity_loss(x, labels, pairs, epsilon=None), pml(x, labels, pairs))


# ArcFace / CosFace ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
@pytest.mark.parametrize("margin", [0.2, 0.5])
def test_margin_softmax_matches_pml(kind, margin):
    x, labels = _data(n=16, d=6, classes=5, dtype=torch.float32)
    x.requires_grad_(True)
    ours = MarginSoftmaxLoss(5, 6, margin=margin, scale=16.0, kind=kind)
    if kind == "arcface":  # PML's ArcFace margin is in degrees
        pml = pml_losses.ArcFaceLoss(5, 6, margin=math.degrees(margin), scale=16.0)
    else:
        pml = pml_losses.CosFaceLoss(5, 6, margin=margin, scale=16.0)
    with torch.no_grad():
        pml.W.copy_(ours.weight.T)  # PML's W is (embedding_size, num_classes)
    got, want = ours(x, labels), pml(x, labels)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0])
    torch.testing.assert_close(torch.autograd.grad(ours(x, labels), ours.weight)[0],
                               torch.autograd.grad(pml(x, labels), pml.W)[0].T)


def _target_cos(loss, x, labels):
    w = torch.nn.functional.normalize(loss.weight.detach().double(), dim=1)
    xs = torch.nn.functional.normalize(x.double(), dim=1)
    return [float(xs[i] @ w[labels[i]]) for i in range(len(labels))]


@pytest.mark.parametrize("easy_margin", [False, True])
def test_arcface_threshold_closed_form(easy_margin):
    m, s = 0.5, 4.0
    loss = MarginSoftmaxLoss(3, 2, margin=m, scale=s, easy_margin=easy_margin)
    with torch.no_grad():
        loss.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]]))
    # angles to the target centre from 0 to pi: below pi/2, past pi/2, and past pi - m (the threshold)
    angles = torch.tensor([0.0, 0.3, 1.2, 1.8, 2.5, 2.9, math.pi])
    x = torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    labels = torch.zeros(len(angles), dtype=torch.long)
    logits = loss.logits(x, labels)
    for i, c in enumerate(_target_cos(loss, x, labels)):
        theta = math.acos(min(max(c, -1 + 1e-7), 1 - 1e-7))
        if easy_margin:
            want = math.cos(theta + m) if c > 0 else c
        else:
            want = math.cos(theta + m) if theta <= math.pi - m else c - m * math.sin(m)
        # float32: the clamp at 1 - 1e-7 rounds to 1 - 1.2e-7, which moves acos near 0 by ~4e-5
        assert logits[i, 0].item() == pytest.approx(s * want, abs=3e-4)
        assert logits[i, 1].item() == pytest.approx(s * x[i, 1].item(), abs=1e-5)  # other classes untouched
    if not easy_margin:  # the threshold keeps the target logit decreasing in the angle
        assert (logits[1:, 0] < logits[:-1, 0]).all()
    x = x.clone().requires_grad_(True)  # cos = +-1 exactly: the clamp keeps gradients finite
    loss(x, labels).backward()
    assert torch.isfinite(x.grad).all()


def test_cosface_closed_form():
    loss = MarginSoftmaxLoss(4, 3, margin=0.35, scale=10.0, kind="cosface")
    x, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 3, 0, 1])
    logits = loss.logits(x, labels)
    for i, c in enumerate(_target_cos(loss, x, labels)):
        assert logits[i, labels[i]].item() == pytest.approx(10.0 * (c - 0.35), abs=1e-5)
    torch.testing.assert_close(loss(x, labels), torch.nn.functional.cross_entropy(logits, labels))


# validation -------------------------------------------------------------------------------------------------------


def test_validation():
    x, labels = _data(n=6, dtype=torch.float32)
    with pytest.raises(ValueError, match="distance"):
        triplet_margin_loss(x, labels, distance="manhattan")
    with pytest.raises(ValueError, match="reduction"):
        contrastive_loss(x, labels, reduction="sum")
    with pytest.raises(ValueError, match="labels"):
        triplet_margin_loss(x, labels.float())
    with pytest.raises(ValueError, match="labels"):
        contrastive_loss(x, labels[:3])
    with pytest.raises(ValueError, match="embeddings"):
        multi_similarity_loss(x[0], labels)
    with pytest.raises(ValueError, match="triplets"):
        triplet_margin_loss(x, labels, (labels, labels))
    with pytest.raises(ValueError, match="triplets"):
        triplet_margin_loss(x, labels, (labels, labels[:2], labels))
    with pytest.raises(ValueError, match="ref_labels"):
        triplet_margin_loss(x, labels, ref_embeddings=x)
    with pytest.raises(ValueError, match="ref_embeddings"):
        contrastive_loss(x, labels, ref_embeddings=x[:, :2], ref_labels=labels)
    with pytest.raises(ValueError, match="exclude_self"):
        contrastive_loss(x, labels, ref_embeddings=x[:2], ref_labels=labels[:2], exclude_self=True)
    with pytest.raises(ValueError, match="chunk_size"):
        contrastive_loss(x, labels, chunk_size=0)
    with pytest.raises(ValueError, match="beta"):
        multi_similarity_loss(x, labels, beta=0.0)
    with pytest.raises(ValueError, match="kind"):
        MarginSoftmaxLoss(3, 4, kind="sphereface")
    with pytest.raises(ValueError, match="margin"):
        MarginSoftmaxLoss(3, 4, margin=2.0)
    with pytest.raises(ValueError, match="num_classes"):
        MarginSoftmaxLoss(1, 4)
    with pytest.raises(ValueError, match="embedding_dim"):
        MarginSoftmaxLoss(3, 4)(x, labels % 3)


def test_pairwise_distance_closed_form():
    x, y = _data(n=5)[0], _data(n=3, seed=1)[0]
    for distance in ("euclidean", "cosine"):
        d = pairwise_distance(x, y, distance)
        for i in range(5):
            for j in range(3):
                assert d[i, j].item() == pytest.approx(_d(x[i].tolist(), y[j].tolist(), distance), abs=1e-12)
