import functools
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cvzoo.ssl.metric_losses import contrastive_loss, triplet_margin_loss
from cvzoo.ssl.miners import (
    MemoryBankMiner,
    Pairs,
    Triplets,
    all_pairs_miner,
    batch_hard_miner,
    distance_weighted_miner,
    distance_weighted_weights,
    semi_hard_miner,
)

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_distances = pytest.importorskip("pytorch_metric_learning.distances")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n=16, d=4, classes=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)


def _grid_data(n=30, seed=0):
    """Integer coordinates: many exactly tied distances, computed exactly in float64 by both sides."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 3, (n, 3), generator=g).double(), torch.randint(0, 3, (n,), generator=g)


def _d(x, y, distance):
    if distance == "euclidean":
        return math.sqrt(sum((a - b) ** 2 for a, b in zip(x, y)))
    dot = sum(a * b for a, b in zip(x, y))
    return 1.0 - dot / (math.sqrt(sum(a * a for a in x)) * math.sqrt(sum(b * b for b in y)))


def _as_list(triplets):
    return list(zip(*(t.tolist() for t in triplets)))


# brute-force references: loops over the batch -----------------------------------------------------------------


def _brute_batch_hard(x, labels, ref, ref_labels, distance, exclude_self):
    x, ref, labels, ref_labels = x.tolist(), ref.tolist(), labels.tolist(), ref_labels.tolist()
    out = []
    for a in range(len(x)):
        best_p = best_n = None
        for j in range(len(ref)):  # ascending j, strict comparisons: ties go to the lowest index
            d = _d(x[a], ref[j], distance)
            if ref_labels[j] == labels[a]:
                if not (exclude_self and j == a) and (best_p is None or d > best_p[0]):
                    best_p = (d, j)
            elif best_n is None or d < best_n[0]:
                best_n = (d, j)
        if best_p is not None and best_n is not None:
            out.append((a, best_p[1], best_n[1]))
    return out


def _brute_semi_hard(x, labels, ref, ref_labels, margin, distance, exclude_self):
    x, ref, labels, ref_labels = x.tolist(), ref.tolist(), labels.tolist(), ref_labels.tolist()
    out = []
    for a in range(len(x)):
        for p in range(len(ref)):
            if ref_labels[p] != labels[a] or (exclude_self and p == a):
                continue
            d_ap = _d(x[a], ref[p], distance)
            best = None
            for n in range(len(ref)):
                if ref_labels[n] == labels[a]:
                    continue
                d_an = _d(x[a], ref[n], distance)
                if d_ap < d_an < d_ap + margin and (best is None or d_an < best[0]):
                    best = (d_an, n)
            if best is not None:
                out.append((a, p, best[1]))
    return out


def _brute_pairs(labels, ref_labels, exclude_self):
    labels, ref_labels = labels.tolist(), ref_labels.tolist()
    pos = [(a, j) for a in range(len(labels)) for j in range(len(ref_labels))
           if ref_labels[j] == labels[a] and not (exclude_self and j == a)]
    neg = [(a, j) for a in range(len(labels)) for j in range(len(ref_labels)) if ref_labels[j] != labels[a]]
    return pos, neg


# batch-hard and semi-hard -----------------------------------------------------------------------------------


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_batch_hard_brute_force(distance):
    x, labels = _data(n=30)
    got = batch_hard_miner(x, labels, distance=distance, chunk_size=7)
    assert isinstance(got, Triplets) and all(t.dtype == torch.long for t in got)
    assert _as_list(got) == _brute_batch_hard(x, labels, x, labels, distance, True)
    ref, ref_labels = _data(n=27, seed=1)
    got = batch_hard_miner(x, labels, distance=distance, ref_embeddings=ref, ref_labels=ref_labels)
    assert _as_list(got) == _brute_batch_hard(x, labels, ref, ref_labels, distance, False)


def test_batch_hard_ties_and_pml():
    x, labels = _grid_data()
    assert _as_list(batch_hard_miner(x, labels)) == _brute_batch_hard(x, labels, x, labels, "euclidean", True)
    x, labels = _data(n=30, dtype=torch.float32)
    pml = pml_miners.BatchHardMiner(distance=pml_distances.LpDistance(normalize_embeddings=False))
    assert _as_list(batch_hard_miner(x, labels)) == _as_list(pml(x, labels))


@pytest.mark.parametrize("distance,margin", [("euclidean", 0.5), ("euclidean", 2.0), ("cosine", 0.3)])
def test_semi_hard_brute_force(distance, margin):
    x, labels = _data(n=28)
    got = semi_hard_miner(x, labels, margin, distance=distance, chunk_size=5)
    want = _brute_semi_hard(x, labels, x, labels, margin, distance, True)
    assert len(want) > 10 and _as_list(got) == want
    ref, ref_labels = _data(n=31, seed=1)
    got = semi_hard_miner(x, labels, margin, distance=distance, ref_embeddings=ref, ref_labels=ref_labels)
    assert _as_list(got) == _brute_semi_hard(x, labels, ref, ref_labels, margin, distance, False)


def test_semi_hard_ties_and_pml():
    x, labels = _grid_data()
    for margin in (0.5, 1.0):  # integer grids put d(a, n) exactly at d(a, p) and at d(a, p) + margin
        got = semi_hard_miner(x, labels, margin)
        assert _as_list(got) == _brute_semi_hard(x, labels, x, labels, margin, "euclidean", True)
    # every triplet is one of PML's semi-hard triplets, and the (a, p) pairs are PML's
    x, labels = _data(n=24, dtype=torch.float32)
    dist = pml_distances.LpDistance(normalize_embeddings=False)
    pml = _as_list(pml_miners.TripletMarginMiner(margin=0.4, type_of_triplets="semihard", distance=dist)(x, labels))
    ours = _as_list(semi_hard_miner(x, labels, 0.4))
    assert set(ours) <= set(pml) and {t[:2] for t in ours} == {t[:2] for t in pml}


def test_all_pairs_brute_force():
    x, labels = _data(n=11)
    got = all_pairs_miner(x, labels, chunk_size=2)
    assert isinstance(got, Pairs)
    pos, neg = _brute_pairs(labels, labels, True)
    assert list(zip(got[0].tolist(), got[1].tolist())) == pos
    assert list(zip(got[2].tolist(), got[3].tolist())) == neg


# distance-weighted --------------------------------------------------------------------------------------------


def _closed_form_weights(x, labels, cutoff, nonzero_loss_cutoff):
    """1 / q(d) with q(d) = d^(n-2) (1 - d^2/4)^((n-3)/2) (Wu et al. 2017), on eligible negatives, rows summing to 1."""
    xs = torch.nn.functional.normalize(x, dim=1).tolist()
    n_dim, labels = x.shape[1], labels.tolist()
    rows = []
    for a in range(len(xs)):
        row = []
        for j in range(len(xs)):
            d = _d(xs[a], xs[j], "euclidean")
            if labels[j] == labels[a] or d >= nonzero_loss_cutoff:
                row.append(0.0)
                continue
            dc = max(d, cutoff)
            row.append(1.0 / (dc ** (n_dim - 2) * (1 - dc * dc / 4) ** ((n_dim - 3) / 2)))
        total = sum(row)
        rows.append([w / total if total else 0.0 for w in row])
    return torch.tensor(rows, dtype=torch.float64)


def _spread_data(n=40, d=5, seed=0):
    x, labels = _data(n=n, d=d, classes=2, seed=seed)
    x[1] = x[0] + 0.05 * x[1]  # near-duplicates across classes: distances under the lower cutoff
    x[3] = x[2] + 0.05 * x[3]
    labels[0], labels[1], labels[2], labels[3] = 0, 1, 1, 0
    return x, labels


def test_distance_weights_closed_form():
    x, labels = _spread_data()
    want = _closed_form_weights(x, labels, 0.5, 1.4)
    assert (want == 0).any() and (want > 0).any()
    got = distance_weighted_weights(x, labels, cutoff=0.5, nonzero_loss_cutoff=1.4, chunk_size=3)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(distance_weighted_weights(x, labels, cutoff=0.3, nonzero_loss_cutoff=1.8),
                               _closed_form_weights(x, labels, 0.3, 1.8))


def test_distance_weighted_sampling():
    x, labels = _spread_data()
    weights = _closed_form_weights(x, labels, 0.5, 1.4)
    dist = torch.cdist(torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(x, dim=1))
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(40, 40, dtype=torch.float64)
    same = labels[:, None] == labels[None, :]
    eligible = ((~same) & (dist < 1.4)).any(1)
    want_pairs = [(a, p) for a in range(40) for p in range(40) if same[a, p] and a != p and eligible[a]]
    for _ in range(150):
        a, p, n = distance_weighted_miner(x, labels, generator=g, chunk_size=16)
        assert list(zip(a.tolist(), p.tolist())) == want_pairs  # one negative per (a, p) pair, row-major
        assert (labels[n] != labels[a]).all() and (dist[a, n] < 1.4).all()  # negatives within the cutoff
        counts.index_put_((a, n), torch.ones(a.shape[0], dtype=torch.float64), accumulate=True)
    freq = counts / counts.sum(1, keepdim=True).clamp(min=1)
    draws = counts.sum(1, keepdim=True).clamp(min=1)
    sigma = (weights * (1 - weights) / draws).sqrt()
    assert ((freq - weights).abs() <= 5 * sigma + 2e-3).all()
    assert (counts[weights == 0] == 0).all()


def test_distance_weighted_without_candidates():
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.tensor([[1.0, 0, 0]]) + 0.01 * torch.randn(4, 3, generator=g),
                   torch.tensor([[-1.0, 0, 0]]) + 0.01 * torch.randn(4, 3, generator=g)])
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    assert all(t.numel() == 0 for t in distance_weighted_miner(x, labels))  # every negative beyond 1.4
    assert (distance_weighted_weights(x, labels) == 0).all()
    # a class-2 point within 1.4 of class 0 (d ~ 1.19 on the sphere) but not of class 1 (d ~ 1.60)
    x = torch.cat([x, torch.tensor([[0.3, 1.0, 0.0]])])
    labels = torch.cat([labels, torch.tensor([2])])
    a, p, n = distance_weighted_miner(x, labels)
    assert set(a.tolist()) == {0, 1, 2, 3} and (n == 8).all()  # class 1 anchors have no eligible negative


# chunking ------------------------------------------------------------------------------------------------------


def test_chunked_equals_unchunked():
    x, labels = _data(n=40, d=6)
    ref, ref_labels = _data(n=33, d=6, seed=5)
    for kwargs in ({}, {"ref_embeddings": ref, "ref_labels": ref_labels}):
        for chunk in (1, 3):
            for miner in (batch_hard_miner, all_pairs_miner, functools.partial(semi_hard_miner, margin=0.7),
                          functools.partial(batch_hard_miner, distance="cosine")):
                got, want = miner(x, labels, chunk_size=chunk, **kwargs), miner(x, labels, **kwargs)
                assert all(torch.equal(a, b) for a, b in zip(got, want))
            torch.testing.assert_close(distance_weighted_weights(x, labels, chunk_size=chunk, **kwargs),
                                       distance_weighted_weights(x, labels, **kwargs))


class _MaxNumel(TorchDispatchMode):
    """Largest output (in elements) of any ATen op run inside the mode."""

    def __init__(self):
        super().__init__()
        self.max = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max = max(self.max, t.numel())
        return out


def test_miners_never_materialise_n_cubed():
    n, chunk = 512, 32
    x = torch.randn(n, 16)
    labels = torch.arange(n) % 128  # 4 a class: outputs of n * 3 triplets stay under the chunk bound
    for miner in (batch_hard_miner, functools.partial(semi_hard_miner, margin=0.5), distance_weighted_miner):
        with _MaxNumel() as counter:
            triplets = miner(x, labels, chunk_size=chunk)
        assert triplets[0].numel() > 0
        assert counter.max <= chunk * n, (miner, counter.max)
    with _MaxNumel() as counter:  # the default chunk of this size is the whole batch: n * n, still not n**3
        batch_hard_miner(x, labels)
    assert n * n // 2 < counter.max <= n * n


# memory bank --------------------------------------------------------------------------------------------------------


def test_memory_bank_fifo_against_a_list():
    bank = MemoryBankMiner(3, size=7)
    hand: list[tuple[list[float], int]] = []
    g = torch.Generator().manual_seed(0)
    mem_emb, mem_labels = bank.memory()
    assert mem_emb.shape == (0, 3) and mem_labels.shape == (0,)
    for step, b in enumerate((3, 2, 4, 1, 9, 5)):
        x = torch.randn(b, 3, generator=g, requires_grad=True)
        labels = torch.randint(0, 3, (b,), generator=g)
        mined = bank(x, labels)
        # forward: the reference is [batch; memory oldest first], and the pairs are the brute-force ones
        torch.testing.assert_close(mined.ref_embeddings[:b], x)
        if hand:
            torch.testing.assert_close(mined.ref_embeddings[b:], torch.tensor([e for e, _ in hand]))
        assert mined.ref_labels.tolist() == labels.tolist() + [lab for _, lab in hand]
        pos, neg = _brute_pairs(labels, mined.ref_labels, exclude_self=True)
        a1, p, a2, n = mined.indices
        assert list(zip(a1.tolist(), p.tolist())) == pos and list(zip(a2.tolist(), n.tolist())) == neg
        bank.update(x, labels)
        hand = (hand + list(zip(x.tolist(), labels.tolist())))[-7:]
        mem_emb, mem_labels = bank.memory()
        assert not mem_emb.requires_grad
        torch.testing.assert_close(mem_emb, torch.tensor([e for e, _ in hand]))
        assert mem_labels.tolist() == [lab for _, lab in hand], step
    restored = MemoryBankMiner(3, size=7)
    restored.load_state_dict(bank.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(restored.memory(), bank.memory()))
    bank.reset()
    assert bank.memory()[0].shape == (0, 3)


def test_memory_bank_with_semi_hard_miner_brute_force():
    bank = MemoryBankMiner(4, size=12, miner=functools.partial(semi_hard_miner, margin=1.0))
    for seed in range(3):
        x, labels = _data(n=8, seed=seed)
        mined = bank(x, labels)
        want = _brute_semi_hard(x, labels, mined.ref_embeddings, mined.ref_labels, 1.0, "euclidean", True)
        assert isinstance(mined.indices, Triplets) and _as_list(mined.indices) == want
        bank.update(x, labels)
    assert mined.ref_embeddings.shape == (20, 4)


def _l2():
    return pml_distances.LpDistance(normalize_embeddings=False)


def test_memory_bank_contrastive_matches_pml_cross_batch_memory():
    b, size, d = 8, 20, 5
    bank = MemoryBankMiner(d, size=size)
    # PML enqueues first and counts the batch in its memory: size + b holds the same reference set
    xbm = pml_losses.CrossBatchMemory(pml_losses.ContrastiveLoss(neg_margin=2.0, distance=_l2()), d,
                                      memory_size=size + b)
    for step in range(6):
        x, labels = _data(n=b, d=d, classes=3, seed=step, dtype=torch.float32)
        mined = bank(x, labels)
        got = contrastive_loss(x, labels, mined.indices, neg_margin=2.0, ref_embeddings=mined.ref_embeddings,
                               ref_labels=mined.ref_labels)
        bank.update(x, labels)
        torch.testing.assert_close(got, xbm(x, labels), msg=f"step {step}")


def test_memory_bank_batch_hard_triplet_matches_pml_cross_batch_memory():
    b, size, d = 6, 15, 4
    bank = MemoryBankMiner(d, size=size, miner=batch_hard_miner)
    xbm = pml_losses.CrossBatchMemory(pml_losses.TripletMarginLoss(margin=0.5, distance=_l2()), d,
                                      memory_size=size + b, miner=pml_miners.BatchHardMiner(distance=_l2()))
    for step in range(6):
        x, labels = _data(n=b, d=d, classes=3, seed=10 + step, dtype=torch.float32)
        mined = bank(x, labels)
        got = triplet_margin_loss(x, labels, mined.indices, margin=0.5, ref_embeddings=mined.ref_embeddings,
                                  ref_labels=mined.ref_labels)
        bank.update(x, labels)
        torch.testing.assert_close(got, xbm(x, labels), msg=f"step {step}")


# validation --------------------------------------------------------------------------------------------------------


def test_validation():
    x, labels = _data(n=6)
    with pytest.raises(ValueError, match="distance"):
        batch_hard_miner(x, labels, distance="l1")
    with pytest.raises(ValueError, match="margin"):
        semi_hard_miner(x, labels, 0.0)
    with pytest.raises(ValueError, match="nonzero_loss_cutoff"):
        distance_weighted_miner(x, labels, cutoff=0.5, nonzero_loss_cutoff=0.4)
    with pytest.raises(ValueError, match="nonzero_loss_cutoff"):
        distance_weighted_weights(x, labels, nonzero_loss_cutoff=2.5)
    with pytest.raises(ValueError, match="generator"):
        distance_weighted_miner(x, labels, generator=0)
    with pytest.raises(ValueError, match="labels"):
        batch_hard_miner(x, labels[:2])
    with pytest.raises(ValueError, match="chunk_size"):
        all_pairs_miner(x, labels, chunk_size=-1)
    with pytest.raises(ValueError, match="size"):
        MemoryBankMiner(4, size=0)
    with pytest.raises(ValueError, match="miner"):
        MemoryBankMiner(4, miner="semi_hard")
    with pytest.raises(ValueError, match="embedding_dim"):
        MemoryBankMiner(5)(x.float(), labels)
