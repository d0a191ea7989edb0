"""Miners: which pairs and triplets of a batch a metric loss trains on, as index tensors.

Every miner takes `(B, D)` embeddings and `(B,)` integer labels, optionally a reference set
`ref_embeddings (R, D)` / `ref_labels (R,)` that positives and negatives are drawn from (default: the
batch), and returns a `Triplets` or `Pairs` NamedTuple of int64 index tensors: anchors index the batch, the
others the reference. Feed them to `cvzoo.ssl.metric_losses` (or to pytorch-metric-learning, which takes the
same tuples). See `metric_losses` for `exclude_self` and the distances.

Miners run without gradient and return data-dependent sizes (not compile-clean, by nature). They work over
chunks of `chunk_size` anchor rows (default: rows such that a chunk holds <= 2**22 elements): the largest
intermediate is a (chunk_size, R) tensor, so peak memory is O(chunk_size * R + B * D + R * D + output),
never B * R * R. For B = R = 8192 the default chunk is 512 rows: 4M-element (16 MB in float32) blocks,
where an (N, N, N) triplet tensor would hold 5.5e11 elements. The output has at most one triplet per
(anchor, positive) pair.

`MemoryBankMiner` keeps a FIFO memory of past embeddings to mine across batches (Wang et al. 2020, XBM).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from cvzoo.ssl.metric_losses import (
    DISTANCES,
    _check_choice,
    _check_embeddings,
    _check_labels,
    _check_number,
    _chunk_rows,
    _chunks,
    _distance_rows,
    _pair_masks,
    _prepare,
    _resolve_reference,
)

__all__ = [
    "CrossBatchMined",
    "MemoryBankMiner",
    "Pairs",
    "Triplets",
    "all_pairs_miner",
    "batch_hard_miner",
    "distance_weighted_miner",
    "distance_weighted_weights",
    "semi_hard_miner",
]


class Triplets(NamedTuple):
    anchors: Tensor  # (T,) into the batch
    positives: Tensor  # (T,) into the reference, same label as the anchor
    negatives: Tensor  # (T,) into the reference, another label


class Pairs(NamedTuple):
    pos_anchors: Tensor  # (P,) into the batch
    positives: Tensor  # (P,) into the reference
    neg_anchors: Tensor  # (Q,) into the batch
    negatives: Tensor  # (Q,) into the reference


def _setup(embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor | None, ref_labels: Tensor | None,
           exclude_self: bool | None, distance: str, chunk_size: int | None,
           ) -> tuple[Tensor, Tensor, Tensor, Tensor, bool, list[tuple[int, int]]]:
    _check_choice("distance", distance, DISTANCES)
    emb, labels, ref, ref_labels, exclude_self = _resolve_reference(
        embeddings, labels, ref_embeddings, ref_labels, exclude_self)
    same = ref is emb
    emb = _prepare(emb.detach(), distance)
    ref = emb if same else _prepare(ref.detach(), distance)
    return emb, labels, ref, ref_labels, exclude_self, _chunks(emb.shape[0], _chunk_rows(chunk_size, ref.shape[0]))


def _cat(parts: list[Tensor], device: torch.device) -> Tensor:
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)


@torch.no_grad()
def all_pairs_miner(embeddings: Tensor, labels: Tensor, *, ref_embeddings: Tensor | None = None,
                    ref_labels: Tensor | None = None, exclude_self: bool | None = None,
                    chunk_size: int | None = None) -> Pairs:
    """(B, D), (B,) -> every positive pair (same label, minus (i, i) when excluding self) and every negative
    pair, row-major (anchor, then reference index). The embeddings only give the shape."""
    emb, labels, _, ref_labels, exclude_self, chunks = _setup(
        embeddings, labels, ref_embeddings, ref_labels, exclude_self, "euclidean", chunk_size)
    out: list[list[Tensor]] = [[], [], [], []]
    for s, e in chunks:
        pos, neg = _pair_masks(labels[s:e], ref_labels, s, exclude_self)  # (c, R) each
        for k, mask in enumerate((pos, neg)):
            rows, cols = mask.nonzero(as_tuple=True)
            out[2 * k].append(rows + s)
            out[2 * k + 1].append(cols)
    return Pairs(*(_cat(parts, emb.device) for parts in out))


@torch.no_grad()
def batch_hard_miner(embeddings: Tensor, labels: Tensor, *, distance: str = "euclidean",
                     ref_embeddings: Tensor | None = None, ref_labels: Tensor | None = None,
                     exclude_self: bool | None = None, chunk_size: int | None = None) -> Triplets:
    """(B, D), (B,) -> one triplet per anchor that has a positive and a negative: its farthest positive and
    its nearest negative (Hermans et al. 2017). Ties go to the lowest reference index."""
    emb, labels, ref, ref_labels, exclude_self, chunks = _setup(
        embeddings, labels, ref_embeddings, ref_labels, exclude_self, distance, chunk_size)
    out: list[list[Tensor]] = [[], [], []]
    for s, e in chunks:
        d = _distance_rows(emb[s:e], ref, distance)  # (c, R)
        pos, neg = _pair_masks(labels[s:e], ref_labels, s, exclude_self)
        hardest_pos = d.masked_fill(~pos, -torch.inf).argmax(dim=1)  # argmax returns the first maximum
        hardest_neg = d.masked_fill(~neg, torch.inf).argmin(dim=1)
        rows = (pos.any(dim=1) & neg.any(dim=1)).nonzero().squeeze(1)
        out[0].append(rows + s)
        out[1].append(hardest_pos[rows])
        out[2].append(hardest_neg[rows])
    return Triplets(*(_cat(parts, emb.device) for parts in out))


@torch.no_grad()
def semi_hard_miner(embeddings: Tensor, labels: Tensor, margin: float = 0.2, *, distance: str = "euclidean",
                    ref_embeddings: Tensor | None = None, ref_labels: Tensor | None = None,
                    exclude_self: bool | None = None, chunk_size: int | None = None) -> Triplets:
    """(B, D), (B,) -> for every positive pair (a, p), one semi-hard negative (Schroff et al. 2015):
    d(a, p) < d(a, n) < d(a, p) + margin. Of the semi-hard negatives of (a, p) it picks the hardest, the one
    nearest to the anchor (ties: lowest index); pairs without any are left out. Triplets come row-major in
    (a, p).

    Without a B x R x R comparison: each anchor's negative distances are sorted once (stable), and a binary
    search finds, for every positive distance d(a, p), the first negative distance strictly above it, which
    is the hardest semi-hard candidate; it is kept if below d(a, p) + margin. O(B R log R) time; per chunk a
    (rows, R) sort and a (rows, most positives of a row) search. Reads that count on the host.
    """
    _check_number("margin", margin, low=0, strict=True)
    emb, labels, ref, ref_labels, exclude_self, chunks = _setup(
        embeddings, labels, ref_embeddings, ref_labels, exclude_self, distance, chunk_size)
    r = ref.shape[0]
    out: list[list[Tensor]] = [[], [], []]
    for s, e in chunks:
        d = _distance_rows(emb[s:e], ref, distance)  # (c, R)
        pos, neg = _pair_masks(labels[s:e], ref_labels, s, exclude_self)
        rows, cols = pos.nonzero(as_tuple=True)  # the chunk's (a, p) pairs, row-major
        if rows.numel() == 0:
            continue
        # search only the positive distances: row i's k-th positive goes to column k of a (c, k_max) query
        rank = pos.cumsum(dim=1)[rows, cols] - 1
        queries = d.new_full((e - s, int(rank.max()) + 1), torch.inf)  # (c, k_max); padding is never read
        d_ap = d[rows, cols]
        queries[rows, rank] = d_ap
        neg_sorted, order = d.masked_fill(~neg, torch.inf).sort(dim=1, stable=True)  # (c, R) each
        first_above = torch.searchsorted(neg_sorted, queries, right=True).clamp_(max=r - 1)[rows, rank]  # (P_c,)
        candidate = neg_sorted[rows, first_above]  # smallest negative distance > d(a, p), if any
        keep = (candidate > d_ap) & (candidate < d_ap + margin)
        out[0].append(rows[keep] + s)
        out[1].append(cols[keep])
        out[2].append(order[rows[keep], first_above[keep]])
    return Triplets(*(_cat(parts, emb.device) for parts in out))


def _check_cutoffs(cutoff: float, nonzero_loss_cutoff: float) -> None:
    _check_number("cutoff", cutoff, low=0, strict=True)
    _check_number("nonzero_loss_cutoff", nonzero_loss_cutoff, low=0, strict=True)
    if not cutoff < nonzero_loss_cutoff <= 2:
        raise ValueError(f"nonzero_loss_cutoff must lie in (cutoff, 2] (distances of unit vectors are <= 2), got "
                         f"cutoff={cutoff!r}, nonzero_loss_cutoff={nonzero_loss_cutoff!r}")


def _inverse_density_weights(d: Tensor, neg: Tensor, dim: int, cutoff: float, nonzero_loss_cutoff: float) -> Tensor:
    """(c, R) distances of unit vectors -> (c, R) sampling weights proportional to 1 / q(max(d, cutoff)) on the
    negatives closer than `nonzero_loss_cutoff`, 0 elsewhere, each row scaled so its largest weight is 1.

    q(d) ~ d^(dim-2) (1 - d^2/4)^((dim-3)/2) is the density of the distance between two points drawn uniformly
    on the unit sphere in R^dim (Wu et al. 2017, section 4); it is evaluated in log space, where it does not
    overflow for large dim.
    """
    dc = d.clamp(min=cutoff, max=nonzero_loss_cutoff)  # above the upper cutoff the weight is 0 anyway
    log_w = (2.0 - dim) * dc.log() - ((dim - 3.0) / 2.0) * (1.0 - 0.25 * dc * dc).clamp(min=1e-12).log()
    log_w = log_w.masked_fill(~(neg & (d < nonzero_loss_cutoff)), -torch.inf)
    row_max = log_w.amax(dim=1, keepdim=True)
    return (log_w - row_max.clamp(min=torch.finfo(d.dtype).min)).exp()  # rows without candidates stay all 0


@torch.no_grad()
def distance_weighted_weights(embeddings: Tensor, labels: Tensor, *, cutoff: float = 0.5,
                              nonzero_loss_cutoff: float = 1.4, ref_embeddings: Tensor | None = None,
                              ref_labels: Tensor | None = None, exclude_self: bool | None = None,
                              chunk_size: int | None = None) -> Tensor:
    """(B, D), (B,) -> (B, R) the negative-sampling distribution of `distance_weighted_miner` for each anchor:
    rows sum to 1, or are all 0 for anchors without a negative closer than `nonzero_loss_cutoff`.
    (The miner never builds this whole matrix; it is here for inspection and tests.)"""
    _check_cutoffs(cutoff, nonzero_loss_cutoff)
    emb, labels, ref, ref_labels, exclude_self, chunks = _setup(
        embeddings, labels, ref_embeddings, ref_labels, exclude_self, "cosine", chunk_size)
    rows = []
    for s, e in chunks:
        d = _distance_rows(emb[s:e], ref, "cosine").mul_(2).clamp_(min=0).sqrt_()  # |x - y|^2 = 2 (1 - cos)
        w = _inverse_density_weights(d, _pair_masks(labels[s:e], ref_labels, s, exclude_self)[1], emb.shape[1],
                                     cutoff, nonzero_loss_cutoff)
        rows.append(w / w.sum(dim=1, keepdim=True).clamp(min=torch.finfo(w.dtype).tiny))
    return torch.cat(rows)


@torch.no_grad()
def distance_weighted_miner(embeddings: Tensor, labels: Tensor, *, cutoff: float = 0.5,
                            nonzero_loss_cutoff: float = 1.4, generator: torch.Generator | None = None,
                            ref_embeddings: Tensor | None = None, ref_labels: Tensor | None = None,
                            exclude_self: bool | None = None, chunk_size: int | None = None) -> Triplets:
    """(B, D), (B,) -> one sampled negative per positive pair (a, p) (Wu et al. 2017, "Sampling matters").

    Embeddings are L2-normalised inside (the density below holds on the unit sphere). The negative of (a, p)
    is drawn, independently for each pair and with replacement, from a's negatives n with probability
    proportional to 1 / q(max(d(a, n), cutoff)), and 0 for d(a, n) >= nonzero_loss_cutoff (such negatives
    give no margin-loss gradient); q is the density of distances between uniform points on the sphere (see
    `distance_weighted_weights`). One negative per pair follows the authors' code (k - 1 negatives for an
    anchor with k - 1 positives). Anchors without any negative below `nonzero_loss_cutoff` give no triplets
    (the authors' code then drew uniformly, same-class samples included). Triplets come row-major in (a, p).

    `generator` (on the embeddings' device) seeds the draws; the triplets also depend on `chunk_size` (the
    draws are made chunk by chunk). Reads the largest number of positives per anchor chunk on the host.
    """
    _check_cutoffs(cutoff, nonzero_loss_cutoff)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    emb, labels, ref, ref_labels, exclude_self, chunks = _setup(
        embeddings, labels, ref_embeddings, ref_labels, exclude_self, "cosine", chunk_size)
    out: list[list[Tensor]] = [[], [], []]
    for s, e in chunks:
        d = _distance_rows(emb[s:e], ref, "cosine").mul_(2).clamp_(min=0).sqrt_()  # (c, R) Euclidean on the sphere
        pos, neg = _pair_masks(labels[s:e], ref_labels, s, exclude_self)
        w = _inverse_density_weights(d, neg, emb.shape[1], cutoff, nonzero_loss_cutoff)  # (c, R)
        has_neg = w.sum(dim=1) > 0
        pos = pos & has_neg[:, None]
        k = int(pos.sum(dim=1).max())  # draws per anchor: one per positive (host read)
        if k == 0:
            continue
        # rows without candidates draw from a dummy uniform row; their pairs were dropped from `pos` above
        draws = torch.multinomial(torch.where(has_neg[:, None], w, torch.ones_like(w)), k, replacement=True,
                                  generator=generator)  # (c, k)
        rows, cols = pos.nonzero(as_tuple=True)
        rank = pos.cumsum(dim=1)[rows, cols] - 1  # the j-th positive of its anchor takes the j-th draw
        out[0].append(rows + s)
        out[1].append(cols)
        out[2].append(draws[rows, rank])
    return Triplets(*(_cat(parts, emb.device) for parts in out))


# ---------------------------------------------------------------------------------------------------------
# cross-batch memory


class CrossBatchMined(NamedTuple):
    """What `MemoryBankMiner` hands to a loss: index tuples into the reference `[batch; memory]`."""

    indices: tuple[Tensor, ...]  # the miner's Pairs / Triplets; anchors index the batch, the rest the reference
    ref_embeddings: Tensor  # (B + M, D): the batch as given (with its graph), then the memory (detached)
    ref_labels: Tensor  # (B + M,)


class MemoryBankMiner(nn.Module):
    """Cross-batch memory (Wang et al. 2020, XBM): mines the batch against itself and a FIFO memory of the
    embeddings of past batches.

        bank = MemoryBankMiner(128, size=4096, miner=functools.partial(semi_hard_miner, margin=0.2))
        mined = bank(embeddings, labels)                      # (B, D), (B,)
        loss = triplet_margin_loss(embeddings, labels, mined.indices,
                                   ref_embeddings=mined.ref_embeddings, ref_labels=mined.ref_labels)
        bank.update(embeddings, labels)                       # after the loss: enqueue, oldest out

    `forward` mines (anchors from the batch, positives and negatives from `[batch; memory]`, (i, i) excluded)
    and leaves the memory as it is; `update` enqueues. This is the paper's reference set (the current batch
    plus the `size` most recent past embeddings; the paper counts the batch inside its memory size). The
    default miner takes every pair (`all_pairs_miner`, for contrastive or multi-similarity losses); any
    miner of this module works, called as `miner(embeddings, labels, ref_embeddings=..., ref_labels=...,
    exclude_self=True)`. Memory entries carry no gradient; the batch part of the reference keeps its graph.

    Buffers (saved with the state dict): `memory_embeddings (size, D)`, `memory_labels (size,)`, and the
    ring's write position `ptr` and fill `count`. Reading the memory reads `ptr` and `count` on the host.
    """

    def __init__(self, embedding_dim: int, *, size: int = 4096,
                 miner: Callable[..., tuple[Tensor, ...]] | None = None) -> None:
        super().__init__()
        for name, value in (("embedding_dim", embedding_dim), ("size", size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if miner is not None and not callable(miner):
            raise ValueError(f"miner must be a callable (a miner of cvzoo.ssl.miners) or None, got {miner!r}")
        self.embedding_dim, self.size = embedding_dim, size
        self.miner = miner if miner is not None else all_pairs_miner
        self.register_buffer("memory_embeddings", torch.zeros(size, embedding_dim))
        self.register_buffer("memory_labels", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # next slot to write
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # filled slots

    def extra_repr(self) -> str:
        name = getattr(self.miner, "__name__", None) or getattr(getattr(self.miner, "func", None), "__name__", "")
        return f"embedding_dim={self.embedding_dim}, size={self.size}, miner={name or self.miner!r}"

    def _check(self, embeddings: Tensor, labels: Tensor) -> None:
        _check_embeddings(embeddings, "embeddings")
        if embeddings.shape[1] != self.embedding_dim:
            raise ValueError(f"embeddings must have width embedding_dim={self.embedding_dim}, got shape "
                             f"{tuple(embeddings.shape)}")
        _check_labels(labels, embeddings.shape[0], "labels")

    def memory(self) -> tuple[Tensor, Tensor]:
        """The stored (M, D) embeddings and (M,) labels, oldest first (M = min(enqueued so far, size))."""
        count, ptr = int(self.count), int(self.ptr)
        if count < self.size:
            return self.memory_embeddings[:count], self.memory_labels[:count]
        order = (torch.arange(self.size, device=self.ptr.device) + ptr) % self.size  # ptr is the oldest slot
        return self.memory_embeddings[order], self.memory_labels[order]

    @torch.no_grad()
    def reset(self) -> None:
        """Empties the memory."""
        self.ptr.zero_()
        self.count.zero_()
        self.memory_labels.fill_(-1)

    @torch.no_grad()
    def update(self, embeddings: Tensor, labels: Tensor) -> None:
        """Enqueues a (B, D) batch (detached) and its (B,) labels; the oldest entries leave when full."""
        self._check(embeddings, labels)
        if embeddings.shape[0] > self.size:  # only the newest `size` survive anyway
            embeddings, labels = embeddings[-self.size:], labels[-self.size:]
        b = embeddings.shape[0]
        slots = (self.ptr + torch.arange(b, device=self.ptr.device)) % self.size
        self.memory_embeddings[slots] = embeddings.detach().to(self.memory_embeddings.dtype)
        self.memory_labels[slots] = labels.to(self.memory_labels.dtype)
        self.ptr.copy_((self.ptr + b) % self.size)
        self.count.copy_((self.count + b).clamp(max=self.size))

    def forward(self, embeddings: Tensor, labels: Tensor) -> CrossBatchMined:
        """(B, D), (B,) -> the miner's indices into `[batch; memory]`, with that reference."""
        self._check(embeddings, labels)
        mem_emb, mem_labels = self.memory()
        ref_embeddings = torch.cat([embeddings, mem_emb.to(embeddings.dtype)])  # (B + M, D)
        ref_labels = torch.cat([labels, mem_labels.to(labels.dtype)])  # (B + M,)
        indices = self.miner(embeddings, labels, ref_embeddings=ref_embeddings, ref_labels=ref_labels,
                             exclude_self=True)
        return CrossBatchMined(indices, ref_embeddings, ref_labels)
