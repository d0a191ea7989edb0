"""Nearest-neighbour search over embeddings: one interface over torch (exact), faiss, Annoy and Milvus.

```python
index = NearestNeighborIndex(128, backend="faiss-hnsw", metric="cosine", M=32, ef_search=64)
index.add(embeddings, metadata=[{"path": p} for p in paths])  # (N, 128); ids default to 0..N-1
result = index.search(queries, k=10)                         # (Q, 128) -> ids (Q, 10), distances (Q, 10)
index.save("gallery.idx"); index = NearestNeighborIndex.load("gallery.idx")
```

Conventions, the same for every backend:

- `SearchResult.ids` (Q, k) int64, best first; `-1` pads a row when the index holds fewer than k vectors
  (or an approximate backend found fewer). Searching an empty index is not an error: every id is -1.
- `SearchResult.distances` (Q, k) float32. `metric="l2"`: SQUARED euclidean distance, smaller is better,
  `+inf` at `-1` slots. `metric="cosine"`: cosine similarity in [-1, 1], larger is better, `-inf` at `-1`
  slots. `metric="ip"`: inner product, larger is better, `-inf` at `-1` slots.
- Cosine is computed as the inner product of L2-normalised vectors (embeddings and queries are normalised
  here, before any backend sees them); an all-zero vector stays zero and has similarity 0 to everything.
- Ids are non-negative int64 (-1 is the padding marker), unique in the index. Metadata is one
  JSON-serialisable dict (or None) per row; this class keeps ids and metadata itself, so every backend
  returns them the same way, and `save`/`load` restore them.
- Results are CPU tensors whatever the backend or device.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import uuid
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cvzoo._optional import require

__all__ = ["BACKENDS", "METRICS", "NearestNeighborIndex", "SearchResult", "mine_hard_negatives", "recall_at_k"]

BACKENDS = ("torch", "faiss-flat", "faiss-ivf", "faiss-hnsw", "annoy", "milvus")
METRICS = ("l2", "cosine", "ip")
_FORMAT_VERSION = 1


class SearchResult(NamedTuple):
    ids: Tensor  # (Q, k) int64, best first, -1 where no neighbour was found
    distances: Tensor  # (Q, k) float32: l2 -> squared euclidean (+inf at -1); cosine/ip -> similarity (-inf at -1)
    metadata: list[list[dict | None]]  # Q lists of k: the row's metadata, None at -1 slots or rows added without


# ----------------------------------------------------------------------------------------------------------------
# Backends. Each sees float32 CPU (N, D) tensors already normalised for cosine, int64 ids that are new and
# valid, and returns (Q, <=k) ids / distances in the public convention; the facade pads and validates.
# Backends treat "cosine" as "ip" (the vectors are unit length) unless they have a better native form.
# ----------------------------------------------------------------------------------------------------------------


class _Backend:
    OPTIONS: dict[str, Any] = {}

    def __init__(self, dim: int, metric: str, **options: Any) -> None:
        self.dim, self.metric = dim, metric
        self.options = {**self.OPTIONS, **options}

    @property
    def is_trained(self) -> bool:
        return True

    def train(self, x: Tensor) -> None:  # only IVF learns anything; elsewhere a no-op so callers need not care
        pass

    def add(self, x: Tensor, ids: Tensor, metadata: list[dict | None]) -> None:
        raise NotImplementedError

    def remove(self, ids: Tensor) -> None:
        raise NotImplementedError

    def search(self, q: Tensor, k: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def save(self, directory: Path) -> dict[str, Any]:
        """Writes the backend's files into `directory`; returns the options to record."""
        raise NotImplementedError

    @classmethod
    def load(cls, directory: Path, dim: int, metric: str, options: dict[str, Any]) -> _Backend:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _TorchBackend(_Backend):
    """Exact search: scores of a chunk of queries against a chunk of the database, merged by a running top-k."""

    OPTIONS = {"device": "cpu", "chunk_size": 4096}

    def __init__(self, dim: int, metric: str, **options: Any) -> None:
        super().__init__(dim, metric, **options)
        chunk = self.options["chunk_size"]
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk!r}")
        try:
            self.device = torch.device(self.options["device"])
        except RuntimeError as err:
            raise ValueError(f"device must name a torch device, got {self.options['device']!r}") from err
        self.vectors = torch.empty(0, dim, device=self.device)
        self.ids = torch.empty(0, dtype=torch.long, device=self.device)

    def add(self, x: Tensor, ids: Tensor, metadata: list[dict | None]) -> None:
        self.vectors = torch.cat([self.vectors, x.to(self.device)])
        self.ids = torch.cat([self.ids, ids.to(self.device)])

    def remove(self, ids: Tensor) -> None:
        keep = ~torch.isin(self.ids, ids.to(self.device))
        self.vectors, self.ids = self.vectors[keep], self.ids[keep]

    def search(self, q: Tensor, k: int) -> tuple[Tensor, Tensor]:
        n, chunk = self.vectors.shape[0], self.options["chunk_size"]
        k = min(k, n)
        q = q.to(self.device)
        sq_norms = self.vectors.square().sum(1)  # (N,)
        out_scores, out_pos = [], []
        for qc in q.split(chunk):  # (C, D)
            best_s = torch.full((qc.shape[0], 0), -math.inf, device=self.device)
            best_i = torch.empty((qc.shape[0], 0), dtype=torch.long, device=self.device)
            for start in range(0, n, chunk):
                xc = self.vectors[start:start + chunk]  # (M, D)
                s = qc @ xc.T  # (C, M)
                if self.metric == "l2":
                    # ||q - x||^2 = ||q||^2 - 2 q.x + ||x||^2 as one matmul (as faiss does); ||q||^2 is the same
                    # for the whole row, so it is added back only at the end
                    s = 2 * s - sq_norms[start:start + chunk]
                pos = torch.arange(start, start + xc.shape[0], device=self.device).expand_as(s)
                s, i = torch.cat([best_s, s], 1), torch.cat([best_i, pos], 1)
                top = s.topk(min(k, s.shape[1]), dim=1)
                best_s, best_i = top.values, i.gather(1, top.indices)
            if self.metric == "l2":
                best_s = (qc.square().sum(1, keepdim=True) - best_s).clamp(min=0)  # squared distance, >= 0
            out_scores.append(best_s)
            out_pos.append(best_i)
        pos = torch.cat(out_pos)
        return self.ids[pos].cpu(), torch.cat(out_scores).float().cpu()

    def save(self, directory: Path) -> dict[str, Any]:
        np.save(directory / "vectors.npy", self.vectors.cpu().numpy())
        np.save(directory / "vector_ids.npy", self.ids.cpu().numpy())
        return dict(self.options)

    @classmethod
    def load(cls, directory: Path, dim: int, metric: str, options: dict[str, Any]) -> _TorchBackend:
        backend = cls(dim, metric, **options)
        backend.add(torch.from_numpy(np.load(directory / "vectors.npy")),
                    torch.from_numpy(np.load(directory / "vector_ids.npy")), [])
        return backend


def _faiss():
    return require("faiss", "search", "faiss nearest-neighbour backends")


class _FaissBackend(_Backend):
    """faiss IndexFlat / IndexIVFFlat / IndexHNSWFlat with user ids.

    Flat and HNSW sit in an `IndexIDMap2`. IVF does NOT: IndexIVF stores the ids it is given, while
    `IndexIDMap2(IndexIVFFlat).remove_ids` leaves the id map out of step with the inverted lists (it compacts
    the map as if the inner index shifted its rows, which IVF does not), so searches after a removal return
    wrong ids: a known faiss limitation (facebookresearch/faiss#1379, #4535, "wontfix"). IVF therefore takes
    `add_with_ids` / `remove_ids` natively. HNSW cannot delete from its graph: removal rebuilds it from the
    remaining stored vectors (the cost of a fresh build).
    """

    KIND = ""

    def __init__(self, dim: int, metric: str, **options: Any) -> None:
        super().__init__(dim, metric, **options)
        for name, value in self.options.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{self.KIND} option {name} must be a positive integer, got {value!r}")
        self.index = self._new_index()

    def _faiss_metric(self):
        faiss = _faiss()
        return faiss.METRIC_L2 if self.metric == "l2" else faiss.METRIC_INNER_PRODUCT

    def _new_index(self):
        raise NotImplementedError

    def _configure(self) -> None:  # search-time knobs, re-applied after load so load overrides take effect
        pass

    def add(self, x: Tensor, ids: Tensor, metadata: list[dict | None]) -> None:
        self.index.add_with_ids(x.numpy(), ids.numpy())

    def remove(self, ids: Tensor) -> None:
        self.index.remove_ids(ids.numpy())

    def search(self, q: Tensor, k: int) -> tuple[Tensor, Tensor]:
        dist, ids = self.index.search(q.numpy(), k)
        return torch.from_numpy(ids).long(), torch.from_numpy(dist).float()

    def save(self, directory: Path) -> dict[str, Any]:
        _faiss().write_index(self.index, str(directory / "faiss.index"))
        return dict(self.options)

    @classmethod
    def load(cls, directory: Path, dim: int, metric: str, options: dict[str, Any]) -> _FaissBackend:
        backend = cls(dim, metric, **options)
        backend.index = _faiss().read_index(str(directory / "faiss.index"))
        backend._configure()
        return backend


class _FaissFlatBackend(_FaissBackend):
    KIND = "faiss-flat"

    def _new_index(self):
        faiss = _faiss()
        flat = faiss.IndexFlatL2(self.dim) if self.metric == "l2" else faiss.IndexFlatIP(self.dim)
        return faiss.IndexIDMap2(flat)


class _FaissIVFBackend(_FaissBackend):
    KIND = "faiss-ivf"
    OPTIONS = {"nlist": 100, "nprobe": 10}

    def _new_index(self):
        faiss = _faiss()
        quantizer = faiss.IndexFlatL2(self.dim) if self.metric == "l2" else faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, self.options["nlist"], self._faiss_metric())
        index.nprobe = self.options["nprobe"]
        self._quantizer = quantizer  # the IVF index only points at it
        return index

    def _configure(self) -> None:
        self.index.nprobe = self.options["nprobe"]

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    def train(self, x: Tensor) -> None:
        nlist = self.options["nlist"]
        if self.index.ntotal > 0:
            raise ValueError(f"faiss-ivf is already trained and holds {self.index.ntotal} vectors; train() "
                             "must come before add (remove everything or build a new index to retrain)")
        if x.shape[0] < nlist:
            raise ValueError(f"faiss-ivf needs at least nlist={nlist} vectors to train its coarse quantiser, got "
                             f"{x.shape[0]}; call train() with a larger representative sample or pass a smaller "
                             "nlist")
        self.index = self._new_index()  # retraining an empty index starts from fresh centroids
        self.index.train(x.numpy())


class _FaissHNSWBackend(_FaissBackend):
    KIND = "faiss-hnsw"
    OPTIONS = {"M": 32, "ef_construction": 40, "ef_search": 64}

    def _new_index(self):
        faiss = _faiss()
        hnsw = faiss.IndexHNSWFlat(self.dim, self.options["M"], self._faiss_metric())
        hnsw.hnsw.efConstruction = self.options["ef_construction"]
        hnsw.hnsw.efSearch = self.options["ef_search"]
        return faiss.IndexIDMap2(hnsw)

    def _configure(self) -> None:
        _faiss().downcast_index(self.index.index).hnsw.efSearch = self.options["ef_search"]

    def remove(self, ids: Tensor) -> None:
        faiss = _faiss()
        inner = faiss.downcast_index(self.index.index)
        vectors = inner.reconstruct_n(0, inner.ntotal)  # (N, D) in insertion order, aligned with id_map
        stored = faiss.vector_to_array(self.index.id_map)
        keep = ~np.isin(stored, ids.numpy())
        self.index = self._new_index()
        if keep.any():
            self.index.add_with_ids(np.ascontiguousarray(vectors[keep]), stored[keep])


class _AnnoyBackend(_Backend):
    """Annoy forest over a copy of the vectors kept here.

    Annoy indexes are immutable once built, so the forest is built lazily on the first search after any
    add or remove, from all stored vectors: interleaving adds and searches costs a full rebuild each time.
    Annoy item numbers are positions 0..N-1 in the stored arrays (Annoy allocates up to the largest item
    number), mapped back to the user's ids. `search_k=-1` is Annoy's default (n_trees * k nodes inspected);
    raise it for better recall.
    """

    OPTIONS = {"n_trees": 10, "search_k": -1, "seed": 0, "n_jobs": -1}

    def __init__(self, dim: int, metric: str, **options: Any) -> None:
        super().__init__(dim, metric, **options)
        if not isinstance(self.options["n_trees"], int) or self.options["n_trees"] < 1:
            raise ValueError(f"annoy option n_trees must be a positive integer, got {self.options['n_trees']!r}")
        self._annoy_module = require("annoy", "search", "the Annoy nearest-neighbour backend")
        self.vectors = np.empty((0, dim), dtype=np.float32)
        self.ids = np.empty(0, dtype=np.int64)
        self.forest = None  # the built AnnoyIndex, None while stale

    @property
    def _annoy_metric(self) -> str:
        return {"l2": "euclidean", "cosine": "angular", "ip": "dot"}[self.metric]

    def add(self, x: Tensor, ids: Tensor, metadata: list[dict | None]) -> None:
        self.vectors = np.concatenate([self.vectors, x.numpy()])
        self.ids = np.concatenate([self.ids, ids.numpy()])
        self.forest = None

    def remove(self, ids: Tensor) -> None:
        keep = ~np.isin(self.ids, ids.numpy())
        self.vectors, self.ids = self.vectors[keep], self.ids[keep]
        self.forest = None

    def _build(self):
        forest = self._annoy_module.AnnoyIndex(self.dim, self._annoy_metric)
        forest.set_seed(self.options["seed"])
        for i, v in enumerate(self.vectors):  # Annoy has no batch add
            forest.add_item(i, v)
        forest.build(self.options["n_trees"], n_jobs=self.options["n_jobs"])
        return forest

    def search(self, q: Tensor, k: int) -> tuple[Tensor, Tensor]:
        if self.forest is None:
            self.forest = self._build()
        k = min(k, len(self.ids))
        out_ids = np.full((q.shape[0], k), -1, dtype=np.int64)
        out_d = np.full((q.shape[0], k), np.nan, dtype=np.float32)
        for row, v in enumerate(q.numpy()):  # Annoy answers one query at a time
            pos, dist = self.forest.get_nns_by_vector(v, k, search_k=self.options["search_k"], include_distances=True)
            out_ids[row, :len(pos)] = self.ids[pos]
            out_d[row, :len(pos)] = dist
        d = torch.from_numpy(out_d)
        if self.metric == "l2":
            d = d.square()  # Annoy's euclidean is the plain distance
        elif self.metric == "cosine":
            d = 1 - d.square() / 2  # Annoy's angular distance is sqrt(2 - 2 cos)
        return torch.from_numpy(out_ids), d

    def save(self, directory: Path) -> dict[str, Any]:
        np.save(directory / "vectors.npy", self.vectors)
        np.save(directory / "vector_ids.npy", self.ids)
        if len(self.ids):
            if self.forest is None:  # build now so that the loaded index answers exactly like this one
                self.forest = self._build()
            self.forest.save(str(directory / "annoy.ann"))
        return dict(self.options)

    @classmethod
    def load(cls, directory: Path, dim: int, metric: str, options: dict[str, Any]) -> _AnnoyBackend:
        backend = cls(dim, metric, **options)
        backend.vectors = np.load(directory / "vectors.npy")
        backend.ids = np.load(directory / "vector_ids.npy")
        if (directory / "annoy.ann").exists():
            # memory-maps the saved file (Annoy's own load); a later add/remove rebuilds in memory
            backend.forest = backend._annoy_module.AnnoyIndex(dim, backend._annoy_metric)
            backend.forest.load(str(directory / "annoy.ann"))
        return backend


def _is_lite(uri: str) -> bool:
    return not uri.startswith(("http://", "https://", "tcp://", "unix:"))


def _release_lite(db_path: str, tmpdir: str | None) -> None:
    """Stops the in-process Milvus Lite server of `db_path` and deletes the temp dir it lived in."""
    try:
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(db_path)
    except (ImportError, AttributeError):  # older milvus-lite: its server goes away with the process
        pass
    if tmpdir is not None:
        shutil.rmtree(tmpdir, ignore_errors=True)


class _MilvusBackend(_Backend):
    """A Milvus collection (int64 primary `id`, FLOAT_VECTOR `vector`, JSON `metadata`) via `MilvusClient`.

    `uri`: a local path ending in ".db" runs Milvus Lite embedded in this process (default: a fresh db in a
    temp dir, deleted by `close()` or at exit); "http://host:19530" reaches a Milvus server (`token` for
    auth, never saved). The collection is created here (`overwrite=True` drops an existing one of the same
    name) with `consistency_level="Strong"` so a search sees every earlier insert. Default `index_type` is
    "FLAT" (exact); any Milvus index type and its `index_params` / `search_params` pass through.
    The JSON field holds each row's metadata (`{}` for none) so other Milvus clients can filter on it.
    `save` of a Milvus Lite index briefly stops that db's in-process server to copy it consistently, which
    drops the connections of any other client of the same db in this process.
    """

    OPTIONS = {"uri": None, "collection": None, "index_type": "FLAT", "index_params": None, "search_params": None,
               "token": "", "overwrite": False}
    MAX_TOPK = 16384  # Milvus' limit on k
    INSERT_BATCH = 4096  # rows per insert call, under gRPC's message size limit for D up to a few thousand

    def __init__(self, dim: int, metric: str, *, _create: bool = True, **options: Any) -> None:
        super().__init__(dim, metric, **options)
        pymilvus = require("pymilvus", "milvus", "the Milvus nearest-neighbour backend")
        self._tmpdir = None
        if self.options["uri"] is None:
            self._tmpdir = tempfile.mkdtemp(prefix="cvzoo-milvus-")
            self.options["uri"] = str(Path(self._tmpdir) / "index.db")
        uri = str(self.options["uri"])
        if _is_lite(uri):
            if not uri.endswith(".db"):
                raise ValueError(f"a Milvus Lite uri must be a file path ending in '.db', got {uri!r}")
            require("milvus_lite", "milvus", "Milvus Lite (a local '.db' uri)")
            uri = self.options["uri"] = str(Path(uri).absolute())
        if self.options["collection"] is None:
            self.options["collection"] = f"cvzoo_{uuid.uuid4().hex[:16]}"
        self.collection = self.options["collection"]
        self._finalizer = weakref.finalize(self, _release_lite, uri, self._tmpdir) if self._tmpdir else None
        self._connect()
        if _create:
            self._create_collection(pymilvus)
        elif not self.client.has_collection(self.collection):
            raise ValueError(f"Milvus collection {self.collection!r} not found at {uri!r}")
        else:
            self.client.load_collection(self.collection)

    def _connect(self) -> None:
        pymilvus = require("pymilvus", "milvus", "the Milvus nearest-neighbour backend")
        self.client = pymilvus.MilvusClient(uri=str(self.options["uri"]), token=self.options["token"] or "")

    @property
    def _milvus_metric(self) -> str:
        return "L2" if self.metric == "l2" else "IP"

    def _create_collection(self, pymilvus) -> None:
        if self.client.has_collection(self.collection):
            if not self.options["overwrite"]:
                raise ValueError(f"Milvus collection {self.collection!r} already exists at {self.options['uri']!r}; "
                                 "reopen a saved index with NearestNeighborIndex.load, or pass overwrite=True")
            self.client.drop_collection(self.collection)
        schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", pymilvus.DataType.INT64, is_primary=True)
        schema.add_field("vector", pymilvus.DataType.FLOAT_VECTOR, dim=self.dim)
        schema.add_field("metadata", pymilvus.DataType.JSON)
        index_params = self.client.prepare_index_params()
        index_params.add_index(field_name="vector", index_type=self.options["index_type"],
                               metric_type=self._milvus_metric, params=dict(self.options["index_params"] or {}))
        self.client.create_collection(self.collection, schema=schema, index_params=index_params,
                                      consistency_level="Strong")

    def add(self, x: Tensor, ids: Tensor, metadata: list[dict | None]) -> None:
        rows = [{"id": i, "vector": v, "metadata": m or {}} for i, v, m in zip(ids.tolist(), x.tolist(), metadata)]
        for start in range(0, len(rows), self.INSERT_BATCH):
            self.client.insert(self.collection, rows[start:start + self.INSERT_BATCH])

    def remove(self, ids: Tensor) -> None:
        self.client.delete(self.collection, ids=ids.tolist())

    QUERY_CHUNK = 100

    def search(self, q: Tensor, k: int) -> tuple[Tensor, Tensor]:
        if k > self.MAX_TOPK:
            raise ValueError(f"k must be <= {self.MAX_TOPK} with the milvus backend (Milvus' limit), got {k}")
        params = {"metric_type": self._milvus_metric, "params": dict(self.options["search_params"] or {})}
        hits = []
        # queries in chunks: Milvus Lite's memory grows with queries x stored vectors within one call (about
        # 1 KB a pair: 21 GB for 1,000 queries over 20,000 vectors), so one call never gets more than a chunk
        for start in range(0, q.shape[0], self.QUERY_CHUNK):
            hits += self.client.search(self.collection, data=q[start:start + self.QUERY_CHUNK].tolist(), limit=k,
                                       anns_field="vector", output_fields=["id"], search_params=params)
        out_ids = torch.full((q.shape[0], k), -1, dtype=torch.long)
        out_d = torch.full((q.shape[0], k), math.nan)
        for row, row_hits in enumerate(hits):
            out_ids[row, :len(row_hits)] = torch.tensor([h["id"] for h in row_hits], dtype=torch.long)
            out_d[row, :len(row_hits)] = torch.tensor([h["distance"] for h in row_hits])
        return out_ids, out_d  # Milvus' L2 is already squared; IP is the inner product

    def save(self, directory: Path) -> dict[str, Any]:
        options = {key: value for key, value in self.options.items() if key not in ("token", "overwrite")}
        uri = str(self.options["uri"])
        if not _is_lite(uri):  # a server collection is shared state: record where it lives, not a snapshot
            return options
        target = directory / "milvus.db"
        if target.absolute() != Path(uri):
            self.client.flush(self.collection)  # push buffered inserts and deletes to disk
            # Milvus Lite compacts and builds indexes on a background thread after a flush, so a live db can be
            # copied half-written: stop its in-process server (which drains that thread), copy, reconnect.
            # Other clients of the same Lite db in this process lose their connection too.
            self.client.close()
            _release_lite(uri, None)
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            # milvus-lite >= 3 keeps a directory under the .db name, older versions a single file
            (shutil.copytree if Path(uri).is_dir() else shutil.copy2)(uri, target)
            self._connect()
            self.client.load_collection(self.collection)
        return {**options, "uri": None, "lite_copy": "milvus.db"}

    @classmethod
    def load(cls, directory: Path, dim: int, metric: str, options: dict[str, Any]) -> _MilvusBackend:
        options = dict(options)
        lite_copy = options.pop("lite_copy", None)
        if lite_copy is not None and options.get("uri") is None:
            # work on a private copy so the saved files (db and id registry) stay a consistent snapshot
            tmpdir = tempfile.mkdtemp(prefix="cvzoo-milvus-")
            uri = Path(tmpdir) / "index.db"
            source = directory / lite_copy
            try:
                (shutil.copytree if source.is_dir() else shutil.copy2)(source, uri)
                backend = cls(dim, metric, _create=False, **{**options, "uri": str(uri)})
            except BaseException:
                _release_lite(str(uri), tmpdir)
                raise
            backend._tmpdir = tmpdir
            backend._finalizer = weakref.finalize(backend, _release_lite, str(uri), tmpdir)
            return backend
        return cls(dim, metric, _create=False, **options)

    def close(self) -> None:
        self.client.close()
        if self._finalizer is not None:
            self._finalizer()


_BACKEND_CLASSES: dict[str, type[_Backend]] = {
    "torch": _TorchBackend,
    "faiss-flat": _FaissFlatBackend,
    "faiss-ivf": _FaissIVFBackend,
    "faiss-hnsw": _FaissHNSWBackend,
    "annoy": _AnnoyBackend,
    "milvus": _MilvusBackend,
}


# ----------------------------------------------------------------------------------------------------------------
# The public index
# ----------------------------------------------------------------------------------------------------------------


class NearestNeighborIndex:
    """k-nearest-neighbour search over (N, D) embeddings, one interface over several backends.

    Backends and their options (keyword arguments after `metric`):

    - "torch": exact search, chunked matrix products on `device` ("cpu" default), `chunk_size=4096` rows
      of queries and of the database per block. The reference the others are tested against.
    - "faiss-flat": exact, `IndexFlatL2` / `IndexFlatIP` in an `IndexIDMap2`.
    - "faiss-ivf": `IndexIVFFlat`, `nlist=100` cells, `nprobe=10` searched. Needs training: call
      `train(sample)` first, or the first `add` trains on its own vectors (ValueError if fewer than nlist).
    - "faiss-hnsw": `IndexHNSWFlat`, `M=32` links, `ef_construction=40`, `ef_search=64`; removal rebuilds.
    - "annoy": `n_trees=10`, `search_k=-1`, `seed=0`, `n_jobs=-1`; (re)built on the first search after
      adds/removes (Annoy indexes are immutable once built).
    - "milvus": `uri` (None: Milvus Lite in a temp dir; "x.db": Milvus Lite file; "http://host:19530":
      server), `collection`, `index_type="FLAT"`, `index_params`, `search_params`, `token`, `overwrite`.

    See the module docstring for the id / distance / metadata conventions.
    """

    def __init__(self, dim: int, *, backend: str = "torch", metric: str = "l2", **backend_options: Any) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")
        _check_options(backend, backend_options)
        self._dim, self._backend_name, self._metric = dim, backend, metric
        self._impl = _BACKEND_CLASSES[backend](dim, metric, **backend_options)
        self._registry: dict[int, dict | None] = {}  # id -> metadata, in insertion order
        self._next_id = 0

    # -- properties ------------------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def backend(self) -> str:
        return self._backend_name

    @property
    def metric(self) -> str:
        return self._metric

    @property
    def ids(self) -> Tensor:
        """(N,) int64 ids held, in insertion order."""
        return torch.tensor(list(self._registry), dtype=torch.long)

    @property
    def is_trained(self) -> bool:
        """False only for an IVF index that has not been trained yet."""
        return self._impl.is_trained

    def __len__(self) -> int:
        return len(self._registry)

    def __repr__(self) -> str:
        return (f"NearestNeighborIndex(dim={self._dim}, backend={self._backend_name!r}, metric={self._metric!r}, "
                f"size={len(self)})")

    # -- mutation --------------------------------------------------------------------------------------------

    def train(self, embeddings: Tensor | np.ndarray) -> None:
        """(N, D) -> None: trains the IVF coarse quantiser on a representative sample (no-op for the others)."""
        x = self._prepare(embeddings, "embeddings")
        self._impl.train(x)

    def add(self, embeddings: Tensor | np.ndarray, ids: Tensor | np.ndarray | Sequence[int] | None = None,
            metadata: Sequence[dict | None] | None = None) -> Tensor:
        """(N, D) embeddings, optional (N,) int64 ids and N metadata dicts -> the (N,) ids added.

        Default ids continue from one past the largest id ever held (0..N-1 for a first add).
        Everything is validated before the backend is touched, so a rejected add leaves the index unchanged.
        """
        x = self._prepare(embeddings, "embeddings")
        n = x.shape[0]
        if ids is None:
            ids_t = torch.arange(self._next_id, self._next_id + n, dtype=torch.long)
        else:
            ids_t = _as_ids(ids, "ids")
            if ids_t.shape[0] != n:
                raise ValueError(f"ids must have one entry per embedding row ({n}), got {ids_t.shape[0]}")
            if (ids_t < 0).any():
                raise ValueError(f"ids must be non-negative (-1 marks missing neighbours), got "
                                 f"{ids_t[ids_t < 0][:5].tolist()}")
            uniq, counts = ids_t.unique(return_counts=True)
            if (counts > 1).any():
                raise ValueError(f"ids must be unique, got duplicates {uniq[counts > 1][:10].tolist()} in this batch")
        clash = [i for i in ids_t.tolist() if i in self._registry]
        if clash:
            raise ValueError(f"ids {clash[:10]} are already in the index (duplicate ids); remove them first")
        if metadata is None:
            meta: list[dict | None] = [None] * n
        else:
            meta = list(metadata)
            if len(meta) != n:
                raise ValueError(f"metadata must have one dict per embedding row ({n}), got {len(meta)}")
            for i, m in enumerate(meta):
                if m is not None and not isinstance(m, dict):
                    raise ValueError(f"metadata[{i}] must be a dict or None, got {type(m).__name__}")
            try:
                # save() and the Milvus JSON field both need JSON: fail now, not later. Keeping the JSON round
                # trip (a copy) makes a fresh index and a loaded one hold identical metadata (e.g. int keys -> str)
                meta = json.loads(json.dumps(meta))
            except (TypeError, ValueError) as err:
                raise ValueError(f"metadata must be JSON-serialisable: {err}") from err
        if n == 0:
            return ids_t
        if not self._impl.is_trained:
            self._impl.train(x)  # lazily on the first add; raises a ValueError naming nlist if too few
        self._impl.add(x, ids_t, meta)
        self._registry.update(zip(ids_t.tolist(), meta))
        self._next_id = max(self._next_id, int(ids_t.max()) + 1)
        return ids_t

    def remove(self, ids: Tensor | np.ndarray | Sequence[int]) -> None:
        """(M,) ids -> None. Every id must be in the index (ValueError naming the unknown ones otherwise)."""
        ids_t = _as_ids(ids, "ids").unique()
        missing = [i for i in ids_t.tolist() if i not in self._registry]
        if missing:
            raise ValueError(f"ids {missing[:10]} are not in the index")
        if ids_t.numel() == 0:
            return
        self._impl.remove(ids_t)
        for i in ids_t.tolist():
            del self._registry[i]

    # -- queries ---------------------------------------------------------------------------------------------

    def search(self, queries: Tensor | np.ndarray, k: int = 10) -> SearchResult:
        """(Q, D) queries -> SearchResult(ids (Q, k), distances (Q, k), metadata Q x k), best first.

        Searching an empty index returns all -1 ids (no error); see the module docstring for distances.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        k = int(k)
        q = self._prepare(queries, "queries")
        num_q = q.shape[0]
        ids = torch.full((num_q, k), -1, dtype=torch.long)
        dist = torch.empty(num_q, k)
        if len(self) > 0 and num_q > 0:
            found_ids, found_d = self._impl.search(q, k)
            width = min(found_ids.shape[1], k)
            ids[:, :width], dist[:, :width] = found_ids[:, :width], found_d[:, :width]
        worst = math.inf if self._metric == "l2" else -math.inf
        dist = torch.where(ids == -1, torch.full_like(dist, worst), dist)
        metadata = [[self._registry.get(i) if i >= 0 else None for i in row] for row in ids.tolist()]
        return SearchResult(ids, dist, metadata)

    # -- persistence -----------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Writes a directory at `path`: index.json (backend, metric, dim, options), ids.npy, metadata.json and
        the backend's files (faiss.index, annoy.ann + vectors, vectors.npy, or a Milvus Lite db copy; a Milvus
        server collection is recorded by uri and name, not copied)."""
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        options = self._impl.save(directory)
        config = {"format": _FORMAT_VERSION, "backend": self._backend_name, "metric": self._metric,
                  "dim": self._dim, "next_id": self._next_id, "options": options}
        (directory / "index.json").write_text(json.dumps(config, indent=2))
        np.save(directory / "ids.npy", np.asarray(list(self._registry), dtype=np.int64))
        (directory / "metadata.json").write_text(json.dumps(list(self._registry.values())))

    @classmethod
    def load(cls, path: str | Path, **backend_options: Any) -> NearestNeighborIndex:
        """Restores an index written by `save`: backend, options, ids, metadata and vectors.

        `backend_options` override saved options (e.g. `device="cuda"`, `nprobe=32`, a Milvus `token`).
        A Milvus Lite index is reopened on a private temp copy of the saved db, so the saved directory stays
        a consistent snapshot; a Milvus server index reconnects to the recorded collection.
        """
        directory = Path(path)
        if not (directory / "index.json").exists():
            raise ValueError(f"path must be a directory written by NearestNeighborIndex.save, got {str(path)!r}")
        config = json.loads((directory / "index.json").read_text())
        if config.get("format") != _FORMAT_VERSION:
            raise ValueError(f"unsupported index format {config.get('format')!r} in {str(path)!r}, expected "
                             f"{_FORMAT_VERSION}")
        backend, metric, dim = config["backend"], config["metric"], config["dim"]
        _check_options(backend, backend_options)
        index = cls.__new__(cls)
        index._dim, index._backend_name, index._metric = dim, backend, metric
        index._impl = _BACKEND_CLASSES[backend].load(directory, dim, metric, {**config["options"], **backend_options})
        ids = np.load(directory / "ids.npy").tolist()
        metadata = json.loads((directory / "metadata.json").read_text())
        index._registry = dict(zip(ids, metadata))
        index._next_id = config["next_id"]
        return index

    def close(self) -> None:
        """Releases backend resources (the Milvus connection and a temp Milvus Lite db); the index is unusable
        afterwards. Not needed for the in-memory backends."""
        self._impl.close()

    def __enter__(self) -> NearestNeighborIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers ---------------------------------------------------------------------------------------------

    def _prepare(self, x: Tensor | np.ndarray, name: str) -> Tensor:
        """Array-like (N, D) -> float32 CPU contiguous (N, D), unit rows for cosine; ValueError on bad shape."""
        t = x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
        if t.ndim != 2:
            raise ValueError(f"{name} must be a 2-D (N, D) array with D={self._dim}, got shape {tuple(t.shape)}")
        if t.shape[1] != self._dim:
            raise ValueError(f"{name} have dimension {t.shape[1]} but the index was built with dim={self._dim}")
        if t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{name} must be real numbers, got dtype {t.dtype}")
        t = t.detach().to("cpu", torch.float32).contiguous()
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contain NaN or infinite values")
        if self._metric == "cosine":
            t = F.normalize(t, dim=1)
        return t


def _check_options(backend: str, options: dict[str, Any]) -> None:
    known = _BACKEND_CLASSES[backend].OPTIONS
    unknown = sorted(set(options) - set(known))
    if unknown:
        listed = ", ".join(known) if known else "none"
        raise ValueError(f"unknown option(s) {unknown} for backend {backend!r}; its options are: {listed}")


def _as_ids(ids: Tensor | np.ndarray | Sequence[int], name: str) -> Tensor:
    if isinstance(ids, Tensor):
        t = ids
    else:
        arr = np.asarray(ids)
        t = torch.as_tensor(arr.astype(np.int64) if arr.size == 0 else arr)  # [] would otherwise be float
    if t.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of integers, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be integers, got dtype {t.dtype}")
    return t.to("cpu", torch.long)


# ----------------------------------------------------------------------------------------------------------------
# Helpers built on the index
# ----------------------------------------------------------------------------------------------------------------


def recall_at_k(approx_ids: Tensor | np.ndarray, exact_ids: Tensor | np.ndarray) -> float:
    """(Q, k1) approximate ids, (Q, k2) exact ids -> fraction of the exact neighbours (ignoring -1 entries)
    that appear anywhere in the same row of the approximate ids. 1.0 when there is nothing to find."""
    approx, exact = torch.as_tensor(np.asarray(approx_ids)), torch.as_tensor(np.asarray(exact_ids))
    if approx.ndim != 2 or exact.ndim != 2 or approx.shape[0] != exact.shape[0]:
        raise ValueError(f"approx_ids and exact_ids must be (Q, k) with the same Q, got shapes "
                         f"{tuple(approx.shape)} and {tuple(exact.shape)}")
    valid = exact != -1  # (Q, k2)
    found = (exact[:, :, None] == approx[:, None, :]).any(2) & valid  # (Q, k2)
    total = int(valid.sum())
    return 1.0 if total == 0 else int(found.sum()) / total


def mine_hard_negatives(index: NearestNeighborIndex, embeddings: Tensor | np.ndarray, labels: Tensor | np.ndarray,
                        k: int = 10, *, query_labels: Tensor | np.ndarray | None = None) -> Tensor:
    """Hard-negative mining from an index: for each query, its k nearest indexed rows of a DIFFERENT label.

    `index` holds a dataset's embeddings under ids that are row numbers into `labels` (N,) (the default ids
    of a single `index.add(dataset_embeddings)`). `embeddings` (Q, D) are the queries; their labels are
    `query_labels` (Q,), by default `labels` itself (the queries are the indexed dataset, Q == N).
    Returns (Q, k) int64 row numbers, nearest first, -1 where fewer than k rows of another label exist
    (or the approximate backend found fewer).

    The index returns neighbours of all labels, so it is searched for more than k: 4k at first, doubling
    for the rows still short of k, up to the whole index (exact for the exact backends).

    ```python
    index = NearestNeighborIndex(d, backend="faiss-flat", metric="cosine")
    index.add(dataset_embeddings)                     # ids 0..N-1
    negatives = mine_hard_negatives(index, dataset_embeddings, dataset_labels, k=5)  # (N, 5)
    ```
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    k = int(k)
    labels_t = torch.as_tensor(np.asarray(labels)).reshape(-1).cpu()
    queries = embeddings if isinstance(embeddings, Tensor) else torch.as_tensor(np.asarray(embeddings))
    num_q = index._prepare(queries, "embeddings").shape[0]  # validates (Q, D) against the index
    q_labels = labels_t if query_labels is None else torch.as_tensor(np.asarray(query_labels)).reshape(-1).cpu()
    if q_labels.shape[0] != num_q:
        what = "labels (queries default to the indexed rows)" if query_labels is None else "query_labels"
        raise ValueError(f"{what} must have one entry per query ({num_q}), got {q_labels.shape[0]}")
    held = index.ids
    if held.numel() and (held.max() >= labels_t.shape[0]):
        raise ValueError(f"index ids must be row numbers into labels (length {labels_t.shape[0]}), but the "
                         f"index holds id {int(held.max())}")
    out = torch.full((num_q, k), -1, dtype=torch.long)
    todo = torch.arange(num_q)
    fetch = min(4 * k, len(index))
    while todo.numel() and fetch > 0:
        ids = index.search(queries[todo.to(queries.device)], fetch).ids  # (T, fetch)
        negative = (ids != -1) & (labels_t[ids.clamp(min=0)] != q_labels[todo, None])  # (T, fetch)
        # stable sort brings each row's negatives to the front, nearest first
        order = torch.sort((~negative).to(torch.int8), dim=1, stable=True).indices[:, :k]  # (T, <=k)
        picked = torch.where(negative.gather(1, order), ids.gather(1, order), torch.full_like(order, -1))
        out[todo, :picked.shape[1]] = picked
        complete = (picked != -1).sum(1) == k
        if fetch >= len(index):
            break
        todo, fetch = todo[~complete], min(2 * fetch, len(index))
    return out
