"""NearestNeighborIndex: every backend against brute force (torch.cdist / matmul + topk written here)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cvzoo.ssl.index import BACKENDS, METRICS, NearestNeighborIndex, mine_hard_negatives, recall_at_k

D = 32


def _missing(*modules: str) -> str | None:
    for module in modules:
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
    return None


_NEEDS = {"torch": (), "faiss-flat": ("faiss",), "faiss-ivf": ("faiss",), "faiss-hnsw": ("faiss",),
          "annoy": ("annoy",), "milvus": ("pymilvus", "milvus_lite")}  # the tests use Milvus Lite only
# sensible settings for 2,000 clustered 32-d vectors (IVF probes 1/8 of the cells, Annoy inspects half the nodes)
_OPTIONS = {"faiss-ivf": {"nlist": 32, "nprobe": 4}, "faiss-hnsw": {"M": 16, "ef_search": 64},
            "annoy": {"n_trees": 20, "search_k": 1000, "n_jobs": 1}}
EXACT = ("torch", "faiss-flat", "milvus")
APPROXIMATE = ("faiss-ivf", "faiss-hnsw", "annoy")


def _param(backend: str):
    reason = _missing(*_NEEDS[backend])
    return pytest.param(backend, id=backend, marks=pytest.mark.skipif(reason is not None, reason=reason or ""))


ALL = [_param(b) for b in BACKENDS]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    faiss = None if _missing("faiss") else importlib.import_module("faiss")
    old_omp = faiss.omp_get_max_threads() if faiss else None
    if faiss:
        faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(old)
    if faiss:
        faiss.omp_set_num_threads(old_omp)


@pytest.fixture(scope="module")
def data():
    """2,000 x 32 embeddings around 20 centres (embeddings cluster by class) and 50 queries near them."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(20, D, generator=g) * 2
    x = centres[torch.randint(0, 20, (2000,), generator=g)] + 0.5 * torch.randn(2000, D, generator=g)
    q = centres[torch.randint(0, 20, (50,), generator=g)] + 0.5 * torch.randn(50, D, generator=g)
    return x, q


@pytest.fixture
def make():
    """Builds indexes and closes them after the test (Milvus Lite servers and temp dbs)."""
    made = []

    def build(backend: str, metric: str = "l2", **options):
        index = NearestNeighborIndex(D, backend=backend, metric=metric, **{**_OPTIONS.get(backend, {}), **options})
        made.append(index)
        return index

    yield build
    for index in made:
        index.close()


def brute_force(x: torch.Tensor, q: torch.Tensor, metric: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D), (Q, D) -> ids (Q, k), distances (Q, k) in float64: squared cdist for l2, similarities otherwise."""
    x, q = x.double(), q.double()
    if metric == "l2":
        d = torch.cdist(q, x, compute_mode="donot_use_mm_for_euclid_dist").square()
        top = d.topk(k, dim=1, largest=False)
    else:
        if metric == "cosine":
            x, q = F.normalize(x, dim=1), F.normalize(q, dim=1)
        top = (q @ x.T).topk(k, dim=1)
    return top.indices, top.values


def true_distance(x: torch.Tensor, q: torch.Tensor, ids: torch.Tensor, metric: str) -> torch.Tensor:
    """The exact distance of each returned id (ids are row numbers of x here)."""
    xs, q = x.double()[ids], q.double()[:, None]  # (Q, k, D), (Q, 1, D)
    if metric == "l2":
        return (xs - q).square().sum(-1)
    if metric == "cosine":
        xs, q = F.normalize(xs, dim=-1), F.normalize(q, dim=-1)
    return (xs * q).sum(-1)


# ---- agreement with brute force ---------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("chunk_size", [4096, 17])  # 17: many query and database chunks merged by the running top-k
def test_torch_backend_equals_cdist_topk(data, metric, chunk_size):
    x, q = data
    index = NearestNeighborIndex(D, metric=metric, chunk_size=chunk_size)
    index.add(x)
    result = index.search(q, k=10)
    ids, dist = brute_force(x, q, metric, 10)
    assert result.ids.dtype == torch.long and result.distances.dtype == torch.float32
    assert torch.equal(result.ids, ids)
    torch.testing.assert_close(result.distances.double(), dist, atol=2e-4, rtol=1e-5)


@pytest.mark.cuda
def test_torch_backend_on_cuda_matches_cpu(data):
    x, q = data
    results = []
    for device in ("cpu", "cuda"):
        index = NearestNeighborIndex(D, metric="l2", device=device, chunk_size=500)
        index.add(x)
        results.append(index.search(q, k=10))
    assert results[1].ids.device.type == "cpu" and torch.equal(results[1].ids, results[0].ids)
    torch.testing.assert_close(results[1].distances, results[0].distances, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("backend", [_param(b) for b in EXACT if b != "torch"])
def test_exact_backends_agree_with_torch(data, make, backend, metric):
    x, q = data
    reference = make("torch", metric)
    reference.add(x)
    index = make(backend, metric)
    index.add(x)
    expected, got = reference.search(q, k=10), index.search(q, k=10)
    assert torch.equal(got.ids, expected.ids)
    assert torch.equal(got.ids, brute_force(x, q, metric, 10)[0])
    torch.testing.assert_close(got.distances, expected.distances, atol=2e-4, rtol=1e-5)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("backend", [_param(b) for b in APPROXIMATE])
def test_approximate_backends_recall(data, make, backend, metric):
    x, q = data
    index = make(backend, metric)
    index.add(x)
    result = index.search(q, k=10)
    assert recall_at_k(result.ids, brute_force(x, q, metric, 10)[0]) >= 0.9
    assert (result.ids >= 0).all()
    # the reported numbers follow the documented convention (squared l2 / similarity), best first
    torch.testing.assert_close(result.distances.double(), true_distance(x, q, result.ids, metric),
                               atol=2e-4, rtol=1e-4)
    step = result.distances.diff(dim=1)
    assert (step >= -1e-4).all() if metric == "l2" else (step <= 1e-4).all()


# ---- ids, metadata, removal, persistence -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL)
def test_ids_and_metadata_come_back(data, make, backend):
    x = data[0][:300]
    ids = 1000 + 3 * torch.arange(300)
    index = make(backend)
    added = index.add(x, ids=ids, metadata=[{"row": i, "name": f"img{i}.png"} for i in range(300)])
    assert torch.equal(added, ids) and len(index) == 300 and torch.equal(index.ids, ids)
    result = index.search(x[:20], k=3)  # each vector's nearest neighbour is itself
    assert torch.equal(result.ids[:, 0], ids[:20])
    assert [m[0] for m in result.metadata] == [{"row": i, "name": f"img{i}.png"} for i in range(20)]
    for row_ids, row_meta in zip(result.ids.tolist(), result.metadata):
        assert [m["row"] for m in row_meta] == [(i - 1000) // 3 for i in row_ids]
    # default ids continue after the largest id held; rows added without metadata give None
    more = index.add(data[0][300:302])
    assert more.tolist() == [1000 + 3 * 299 + 1, 1000 + 3 * 299 + 2]
    found = index.search(data[0][300:302], k=1)
    assert torch.equal(found.ids[:, 0], more) and found.metadata == [[None], [None]]


@pytest.mark.parametrize("backend", ALL)
def test_remove(data, make, backend):
    x = data[0][:300]
    index = make(backend)
    index.add(x, metadata=[{"row": i} for i in range(300)])
    gone = torch.arange(0, 300, 3)
    index.remove(gone)
    assert len(index) == 200 and not torch.isin(index.ids, gone).any()
    kept = torch.tensor([i for i in range(300) if i % 3])
    result = index.search(x, k=5)
    assert not torch.isin(result.ids, gone).any()
    assert torch.equal(result.ids[kept, 0], kept)  # the remaining vectors still find themselves
    if backend in EXACT:
        assert torch.equal(result.ids, kept[brute_force(x[kept], x, "l2", 5)[0]])
    with pytest.raises(ValueError, match="not in the index"):
        index.remove([gone[0].item()])
    index.add(x[gone[:2]], ids=gone[:2], metadata=[{"back": 1}, {"back": 2}])  # a removed id can come back
    back = index.search(x[gone[:2]], k=1)
    assert torch.equal(back.ids[:, 0], gone[:2]) and back.metadata == [[{"back": 1}], [{"back": 2}]]


@pytest.mark.parametrize("backend", ALL)
def test_save_load_round_trip(data, make, backend, tmp_path):
    x, q = data[0][:300], data[1]
    index = make(backend, "cosine")
    index.add(x, ids=torch.arange(300) * 2, metadata=[{"row": i} for i in range(300)])
    index.remove([0, 2])
    before = index.search(q, k=7)
    index.save(tmp_path / "idx")
    loaded = NearestNeighborIndex.load(tmp_path / "idx")
    try:
        assert (loaded.backend, loaded.metric, loaded.dim, len(loaded)) == (backend, "cosine", D, 298)
        assert torch.equal(loaded.ids, index.ids)
        after = loaded.search(q, k=7)
        assert torch.equal(after.ids, before.ids)
        torch.testing.assert_close(after.distances, before.distances)
        assert after.metadata == before.metadata
        # the loaded index keeps working, and the saved directory stays the snapshot it was
        new = loaded.add(q[:1])
        assert new.tolist() == [599] and loaded.search(q[:1], k=1).ids[0, 0] == 599  # one past the largest id
        again = NearestNeighborIndex.load(tmp_path / "idx")
        assert len(again) == 298 and torch.equal(again.search(q, k=7).ids, before.ids)
        again.close()
    finally:
        loaded.close()


@pytest.mark.parametrize("backend", ALL)
def test_add_after_search(data, make, backend):
    x = data[0]
    index = make(backend)
    index.add(x[:200])
    assert torch.equal(index.search(x[:5], k=1).ids[:, 0], torch.arange(5))
    index.add(x[200:260])  # Annoy rebuilds here; the others extend
    assert torch.equal(index.search(x[200:205], k=1).ids[:, 0], torch.arange(200, 205))


# ---- validation and edge cases -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL)
def test_dimension_mismatch(data, make, backend):
    x = data[0]
    index = make(backend)
    with pytest.raises(ValueError, match=r"dimension 33.*dim=32"):
        index.add(torch.randn(10, 33))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        index.add(torch.randn(32))
    assert len(index) == 0
    index.add(x[:100])
    with pytest.raises(ValueError, match=r"dimension 16.*dim=32"):
        index.search(torch.randn(2, 16))


@pytest.mark.parametrize("backend", ALL)
def test_empty_index_and_fewer_than_k(data, make, backend):
    x = data[0]
    index = make(backend, "ip", **({"nprobe": 32} if backend == "faiss-ivf" else {}))  # IVF: probe every cell
    empty = index.search(x[:2], k=4)  # documented: no error, every slot is missing
    assert torch.equal(empty.ids, torch.full((2, 4), -1))
    assert torch.isneginf(empty.distances).all() and empty.metadata == [[None] * 4] * 2
    if backend == "faiss-ivf":
        index.train(x)  # three vectors cannot train 32 cells
    index.add(x[:3], metadata=[{"i": 0}, {"i": 1}, {"i": 2}])
    short = index.search(x[:2], k=5)
    assert (short.ids[:, :3] >= 0).all() and (short.ids[:, 3:] == -1).all()
    assert sorted(short.ids[0, :3].tolist()) == [0, 1, 2]
    assert torch.isneginf(short.distances[:, 3:]).all() and torch.isfinite(short.distances[:, :3]).all()
    assert short.metadata[0][3:] == [None, None] and all(m is not None for m in short.metadata[0][:3])
    l2 = make(backend, "l2")
    assert torch.isposinf(l2.search(x[:1], k=2).distances).all()


@pytest.mark.skipif(_missing("faiss") is not None, reason=_missing("faiss") or "")
def test_ivf_training(data, make):
    x = data[0]
    index = make("faiss-ivf")
    assert not index.is_trained
    with pytest.raises(ValueError, match=r"nlist=32.*got 10.*train\(\)"):
        index.add(x[:10])
    assert len(index) == 0
    index.train(x)
    assert index.is_trained
    index.add(x[:10])
    assert torch.equal(index.search(x[:10], k=1).ids[:, 0], torch.arange(10))
    with pytest.raises(ValueError, match="already trained"):
        index.train(x)
    lazy = make("faiss-ivf")
    lazy.add(x)  # the first add trains on its own vectors
    assert lazy.is_trained and len(lazy) == 2000


def test_validation(data):
    x = data[0][:20]
    with pytest.raises(ValueError, match="torch, faiss-flat, faiss-ivf, faiss-hnsw, annoy, milvus"):
        NearestNeighborIndex(D, backend="scann")
    with pytest.raises(ValueError, match="l2, cosine, ip"):
        NearestNeighborIndex(D, metric="hamming")
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        NearestNeighborIndex(0)
    with pytest.raises(ValueError, match=r"unknown option.*'nprobe'.*device, chunk_size"):
        NearestNeighborIndex(D, nprobe=4)
    index = NearestNeighborIndex(D)
    index.add(x[:10])
    assert index.search(x[:1], k=np.int64(2)).ids.shape == (1, 2)
    for k in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="k must be an integer >= 1"):
            index.search(x, k=k)
    with pytest.raises(ValueError, match=r"\[3\] are already in the index"):
        index.add(x[10:12], ids=[3, 50])
    with pytest.raises(ValueError, match=r"unique.*\[60\]"):
        index.add(x[10:12], ids=[60, 60])
    with pytest.raises(ValueError, match="non-negative"):
        index.add(x[10:12], ids=[-1, 5])
    with pytest.raises(ValueError, match="must be integers"):
        index.add(x[10:12], ids=[11.0, 12.0])
    with pytest.raises(ValueError, match="one entry per embedding row"):
        index.add(x[10:12], ids=[11])
    with pytest.raises(ValueError, match="one dict per embedding row"):
        index.add(x[10:12], metadata=[{}])
    with pytest.raises(ValueError, match="JSON-serialisable"):
        index.add(x[10:12], metadata=[{"t": torch.ones(1)}, None])
    added = index.add(x[10:11], metadata=[{1: (2, 3)}])  # stored as JSON gives it back, also before a save
    assert index.search(x[10:11], k=1).metadata == [[{"1": [2, 3]}]]
    index.remove(added)
    with pytest.raises(ValueError, match="NaN or infinite"):
        index.add(torch.full((1, D), float("nan")))
    assert len(index) == 10 and torch.equal(index.ids, torch.arange(10))  # rejected adds changed nothing


def test_numpy_inputs_match_tensors(data):
    x, q = data
    from_tensor, from_numpy = NearestNeighborIndex(D, metric="cosine"), NearestNeighborIndex(D, metric="cosine")
    from_tensor.add(x[:500])
    from_numpy.add(x[:500].double().numpy(), ids=np.arange(500))
    a, b = from_tensor.search(q, k=5), from_numpy.search(q.numpy(), k=5)
    assert torch.equal(a.ids, b.ids)
    torch.testing.assert_close(a.distances, b.distances)


@pytest.mark.skipif(_missing("pymilvus", "milvus_lite") is not None, reason=_missing("pymilvus", "milvus_lite") or "")
def test_milvus_collection_is_not_clobbered(data, tmp_path):
    x = data[0][:20]
    uri = str(tmp_path / "shared.db")
    first = NearestNeighborIndex(D, backend="milvus", uri=uri, collection="gallery")
    first.add(x)
    with pytest.raises(ValueError, match="already exists"):
        NearestNeighborIndex(D, backend="milvus", uri=uri, collection="gallery")
    second = NearestNeighborIndex(D, backend="milvus", uri=uri, collection="gallery", overwrite=True)
    assert second.search(x[:1], k=1).ids.tolist() == [[-1]]  # a fresh collection took its place
    second.add(x[:2], metadata=[{"a": 1}, None])
    assert second.search(x[:2], k=1).ids[:, 0].tolist() == [0, 1]
    second.close()
    first.close()


# ---- helpers -----------------------------------------------------------------------------------------------------


def test_recall_at_k_closed_form():
    approx = torch.tensor([[1, 2, 3], [4, 5, -1]])
    exact = torch.tensor([[1, 2, 9], [4, -1, -1]])
    assert recall_at_k(approx, exact) == pytest.approx(3 / 4)  # row 0 finds 2 of 3, row 1 finds 1 of 1
    assert recall_at_k(np.array([[7, 8]]), np.array([[8, 7]])) == 1.0  # order does not matter
    assert recall_at_k(torch.tensor([[5]]), torch.tensor([[-1]])) == 1.0  # nothing to find
    with pytest.raises(ValueError, match="same Q"):
        recall_at_k(torch.zeros(2, 3), torch.zeros(3, 3))


def _hard_negatives_by_loop(x, qx, labels, q_labels, k):
    out = []
    for i in range(len(qx)):
        d = [((qx[i] - x[j]) ** 2).sum().item() for j in range(len(x))]
        order = sorted(range(len(x)), key=lambda j: d[j])
        negatives = [j for j in order if labels[j] != q_labels[i]][:k]
        out.append(negatives + [-1] * (k - len(negatives)))
    return torch.tensor(out)


@pytest.mark.parametrize("backend", [_param("torch"), _param("faiss-flat")])
def test_mine_hard_negatives_matches_brute_force(make, backend):
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([0] * 40 + [1] * 12 + [2] * 8)  # imbalanced: class 0 has only 20 negatives
    centres = torch.randn(3, 8, generator=g) * 1.5
    x = centres[labels] + torch.randn(60, 8, generator=g)
    index = NearestNeighborIndex(8, backend=backend)
    index.add(x)
    for k in (3, 25):  # k=3: clustered classes push negatives past 4k, so the search widens; k=25: -1 padding
        mined = mine_hard_negatives(index, x, labels, k=k)
        assert torch.equal(mined, _hard_negatives_by_loop(x, x, labels.tolist(), labels.tolist(), k))
    assert (mined[labels == 0, 20:] == -1).all()
    queries, q_labels = torch.randn(5, 8, generator=g), torch.tensor([0, 1, 2, 0, 1])
    mined = mine_hard_negatives(index, queries, labels, k=4, query_labels=q_labels)
    assert torch.equal(mined, _hard_negatives_by_loop(x, queries, labels.tolist(), q_labels.tolist(), 4))
    with pytest.raises(ValueError, match="one entry per query"):
        mine_hard_negatives(index, queries, labels, k=4)


def test_index_json_records_backend(tmp_path, data):
    index = NearestNeighborIndex(D, metric="ip", chunk_size=128)
    index.add(data[0][:5])
    index.save(tmp_path / "i")
    config = json.loads((tmp_path / "i" / "index.json").read_text())
    assert (config["backend"], config["metric"], config["dim"], config["options"]["chunk_size"]) == ("torch", "ip", D,
                                                                                                     128)
    with pytest.raises(ValueError, match="unknown option"):
        NearestNeighborIndex.load(tmp_path / "i", nprobe=7)
    assert len(NearestNeighborIndex.load(tmp_path / "i", chunk_size=2)) == 5
    with pytest.raises(ValueError, match="written by NearestNeighborIndex.save"):
        NearestNeighborIndex.load(tmp_path / "nothing")
