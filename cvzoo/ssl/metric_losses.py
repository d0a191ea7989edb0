"""Metric-learning losses on embeddings: triplet margin, contrastive, multi-similarity, ArcFace / CosFace.

Conventions shared with `cvzoo.ssl.miners`:

- Embeddings are `(B, D)` float tensors, labels `(B,)` integer class ids. Distances are computed on the
  embeddings as given: "euclidean" is the L2 distance of the raw vectors (normalise them yourself, or use
  "cosine", which is `1 - cos(x, y)` and normalises inside).
- Reference set: anchors always come from the batch; positives and negatives come from `ref_embeddings`
  `(R, D)` / `ref_labels` `(R,)` when given (a cross-batch memory, see `miners.MemoryBankMiner`), else from
  the batch itself. `exclude_self` drops the pairs (i, i), anchor i against reference entry i; it defaults
  to True without a reference (a sample is not its own positive) and False with one. A reference that
  starts with the batch itself (`[batch; memory]`, what `MemoryBankMiner` builds) needs `exclude_self=True`.
- Index tuples, as miners return them and as pytorch-metric-learning takes them: triplets
  `(anchors, positives, negatives)`, pairs `(pos_anchors, positives, neg_anchors, negatives)`; anchors index
  the batch, the others the reference. Index values are not range-checked (that would read them on the host).
- Work that grows with B * R runs over chunks of anchor rows, `chunk_size` rows at a time (default: as many
  rows as keep a chunk under 2**22 elements). No loss materialises a B * R * R tensor.

Mapping to pytorch-metric-learning (PML), whose conventions the tests check:
- PML's `LpDistance` normalises embeddings by default: "euclidean" here equals
  `LpDistance(normalize_embeddings=False)`; "cosine" equals PML's `CosineSimilarity` in the triplet loss
  (margins of similarities and of `1 - similarity` coincide).
- reduction "mean_nonzero" is PML's `AvgNonZeroReducer`, "mean" its `MeanReducer`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DISTANCES = ("euclidean", "cosine")
REDUCTIONS = ("mean_nonzero", "mean")
MARGIN_KINDS = ("arcface", "cosface")
CHUNK_ELEMENTS = 1 << 22  # default chunk: ~4M elements (16 MB in float32) per (rows, R) intermediate

__all__ = [
    "DISTANCES",
    "MarginSoftmaxLoss",
    "contrastive_loss",
    "multi_similarity_loss",
    "pairwise_distance",
    "triplet_margin_loss",
]


# ---------------------------------------------------------------------------------------------------------
# shared helpers (also used by cvzoo.ssl.miners)


def _check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _check_number(name: str, value: object, *, low: float | None = None, strict: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if strict else value >= low
    if not ok:
        bound = "" if low is None else f" {'>' if strict else '>='} {low}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")


def _check_embeddings(x: object, name: str) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a (N, D) float tensor, got {type(x).__name__}")
    if x.ndim != 2 or not x.is_floating_point():
        raise ValueError(f"{name} must be a (N, D) float tensor, got shape {tuple(x.shape)} and dtype {x.dtype}")
    if x.shape[0] < 1:
        raise ValueError(f"{name} must hold at least one embedding, got shape {tuple(x.shape)}")


def _check_labels(labels: object, n: int, name: str) -> None:
    if not isinstance(labels, Tensor):
        raise ValueError(f"{name} must be a ({n},) integer tensor of class ids, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name} has dtype {labels.dtype}; expected an integer dtype (class ids)")
    if tuple(labels.shape) != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(labels.shape)}")


def _check_indices(indices: object, lengths: tuple[int, ...], name: str) -> tuple[Tensor, ...]:
    """Static checks of an index tuple (1-D integer tensors, pairwise equal lengths where paired)."""
    if not isinstance(indices, (tuple, list)) or len(indices) not in lengths:
        got = f"{len(indices)} tensors" if isinstance(indices, (tuple, list)) else type(indices).__name__
        raise ValueError(f"{name} must be a tuple of {' or '.join(map(str, lengths))} index tensors, got {got}")
    for i, t in enumerate(indices):
        if not isinstance(t, Tensor) or t.ndim != 1 or t.is_floating_point() or t.dtype == torch.bool:
            what = f"shape {tuple(t.shape)}, dtype {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name}[{i}] must be a 1-D integer index tensor, got {what}")
    groups = [indices] if len(indices) == 3 else [indices[:2], indices[2:]]
    for group in groups:
        if len({t.shape[0] for t in group}) != 1:
            raise ValueError(f"{name} tensors that index the same tuples must have equal lengths, got "
                             f"{[t.shape[0] for t in indices]}")
    return tuple(indices)


def _float32_under_autocast(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Runs a loss with autocast off: its inputs are cast to float32 (at least) inside, and distances,
    margins and exponentials lose too much in half precision."""

    @functools.wraps(fn)
    def wrapper(embeddings: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        device_type = embeddings.device.type if isinstance(embeddings, Tensor) else "cpu"
        with torch.autocast(device_type, enabled=False):
            return fn(embeddings, *args, **kwargs)

    return wrapper


def _float(x: Tensor) -> Tensor:
    # distances and their margins run in float32 at least: half-precision differences of nearby points lose
    # most of their digits (float64 stays float64)
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _resolve_reference(embeddings: Tensor, labels: Tensor | None, ref_embeddings: Tensor | None,
                       ref_labels: Tensor | None, exclude_self: bool | None, *, need_labels: bool = True,
                       ) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None, bool]:
    """Validates the batch and its reference -> (embeddings, labels, ref_embeddings, ref_labels, exclude_self)."""
    _check_embeddings(embeddings, "embeddings")
    b, dim = embeddings.shape
    if labels is not None or need_labels:
        _check_labels(labels, b, "labels")
    if ref_labels is not None and ref_embeddings is None:
        raise ValueError("ref_labels were given without ref_embeddings; pass both (or neither)")
    if ref_embeddings is not None and ref_labels is None and need_labels:
        raise ValueError("ref_embeddings were given without ref_labels; pass both (or neither), or pass the "
                         "index tuple that makes labels unnecessary")
    if exclude_self is not None and not isinstance(exclude_self, bool):
        raise ValueError(f"exclude_self must be a bool or None, got {exclude_self!r}")
    if ref_embeddings is None:
        return embeddings, labels, embeddings, labels, True if exclude_self is None else exclude_self
    _check_embeddings(ref_embeddings, "ref_embeddings")
    if ref_embeddings.shape[1] != dim:
        raise ValueError(f"ref_embeddings must have the embeddings' width {dim}, got shape "
                         f"{tuple(ref_embeddings.shape)}")
    if ref_labels is not None:
        _check_labels(ref_labels, ref_embeddings.shape[0], "ref_labels")
    exclude_self = bool(exclude_self)
    if exclude_self and ref_embeddings.shape[0] < b:
        raise ValueError(f"exclude_self=True means the reference starts with the batch, so it needs at least "
                         f"{b} rows, got ref_embeddings of shape {tuple(ref_embeddings.shape)}")
    return embeddings, labels, ref_embeddings, ref_labels, exclude_self


def _chunk_rows(chunk_size: int | None, r: int) -> int:
    if chunk_size is None:
        return max(1, CHUNK_ELEMENTS // max(r, 1))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1 or None (automatic), got {chunk_size!r}")
    return chunk_size


def _chunks(n: int, rows: int) -> list[tuple[int, int]]:
    return [(start, min(start + rows, n)) for start in range(0, n, rows)]


def _prepare(x: Tensor, distance: str) -> Tensor:
    """Embeddings ready for `_distance_rows`: float32 at least, unit length for "cosine"."""
    x = _float(x)
    return F.normalize(x, dim=1) if distance == "cosine" else x


def _distance_rows(x: Tensor, y: Tensor, distance: str) -> Tensor:
    """(c, D), (R, D) -> (c, R) on embeddings from `_prepare`."""
    if distance == "cosine":
        return 1.0 - x @ y.T
    return torch.cdist(x, y)  # backward is zero (not NaN) at zero distance


def _paired_distance(x: Tensor, y: Tensor, distance: str) -> Tensor:
    """(T, D), (T, D) -> (T,): row-wise distances on embeddings from `_prepare`."""
    if distance == "cosine":
        return 1.0 - (x * y).sum(dim=1)
    return torch.linalg.vector_norm(x - y, dim=1)  # subgradient 0 at x == y


def _pair_masks(labels: Tensor, ref_labels: Tensor, start: int, exclude_self: bool) -> tuple[Tensor, Tensor]:
    """Labels of anchor rows [start, start + c) vs the reference -> positive and negative masks, both (c, R)."""
    same = labels[:, None] == ref_labels[None, :]  # (c, R)
    if exclude_self:
        rows = torch.arange(start, start + labels.shape[0], device=labels.device)
        same = same & (rows[:, None] != torch.arange(ref_labels.shape[0], device=labels.device)[None, :])
        return same, labels[:, None] != ref_labels[None, :]
    return same, ~same


def pairwise_distance(x: Tensor, y: Tensor | None = None, distance: str = "euclidean") -> Tensor:
    """(B, D), (R, D) -> (B, R) distances: "euclidean" (L2 of the raw vectors) or "cosine" (1 - cosine)."""
    _check_choice("distance", distance, DISTANCES)
    _check_embeddings(x, "x")
    if y is not None:
        _check_embeddings(y, "y")
        if y.shape[1] != x.shape[1]:
            raise ValueError(f"y must have x's width {x.shape[1]}, got shape {tuple(y.shape)}")
    xp = _prepare(x, distance)
    return _distance_rows(xp, xp if y is None else _prepare(y, distance), distance)


def _reduce(losses: Tensor, reduction: str) -> Tensor:
    if reduction == "mean_nonzero":  # PML's AvgNonZeroReducer: mean of the strictly positive terms, 0 if none
        return losses.sum() / (losses > 0).sum().clamp(min=1)
    return losses.sum() / max(losses.shape[0], 1)


# ---------------------------------------------------------------------------------------------------------
# triplet margin loss


@_float32_under_autocast
def triplet_margin_loss(embeddings: Tensor, labels: Tensor | None, triplets: Sequence[Tensor] | None = None, *,
                        margin: float = 0.2, distance: str = "euclidean", reduction: str = "mean_nonzero",
                        ref_embeddings: Tensor | None = None, ref_labels: Tensor | None = None,
                        exclude_self: bool | None = None, chunk_size: int | None = None) -> Tensor:
    """(B, D) embeddings, (B,) labels -> scalar mean of relu(d(a, p) - d(a, n) + margin) over triplets.

    `triplets=(anchors, positives, negatives)` (from a miner; `labels` may then be None) is the batched,
    compile-clean path. Without it the loss runs over every valid triplet (p shares a's label, p != a,
    n has another label) without enumerating them: per chunk of anchors and of (a, p) pairs it counts, for
    each distance d(a, j), how many active triplets (loss > 0) use it as d(a, p) (weight +1) and as d(a, n)
    (weight -1). The loss is then the weighted sum of the (B, R) distance matrix plus margin times the
    number of active triplets: the same value and gradient as the triplet sum (relu is linear on its
    active set), with autograd holding B * R elements instead of B * R * R. Peak extra memory: one
    (rows, R) chunk. That path reads counts on the host (not compile-clean).

    reduction: "mean_nonzero" averages over triplets with a positive loss (PML's default), "mean" over all
    of them; either gives 0 when there are none.
    """
    _check_choice("distance", distance, DISTANCES)
    _check_choice("reduction", reduction, REDUCTIONS)
    _check_number("margin", margin)
    emb, labels, ref, ref_labels, exclude_self = _resolve_reference(
        embeddings, labels, ref_embeddings, ref_labels, exclude_self, need_labels=triplets is None)
    same_ref = ref is emb
    emb = _prepare(emb, distance)
    ref = emb if same_ref else _prepare(ref, distance)

    if triplets is not None:
        a, p, n = _check_indices(triplets, (3,), "triplets")
        xa = emb[a]  # (T, D)
        losses = F.relu(_paired_distance(xa, ref[p], distance) - _paired_distance(xa, ref[n], distance) + margin)
        return _reduce(losses, reduction)

    b, r = emb.shape[0], ref.shape[0]
    rows = _chunk_rows(chunk_size, r)
    dist = torch.cat([_distance_rows(emb[s:e], ref, distance) for s, e in _chunks(b, rows)])  # (B, R)
    weight = torch.zeros(b, r, dtype=dist.dtype, device=dist.device)  # (#as positive) - (#as negative)
    active = dist.new_zeros(())
    total = dist.new_zeros(())
    with torch.no_grad():
        for s, e in _chunks(b, rows):
            d = dist[s:e].detach()  # (c, R)
            pos, neg = _pair_masks(labels[s:e], ref_labels, s, exclude_self)
            total += (pos.sum(1) * neg.sum(1)).sum()
            pr, pc = pos.nonzero(as_tuple=True)  # (a, p) pairs of this chunk, row-major
            for ps, pe in _chunks(pr.shape[0], rows):
                r_, c_ = pr[ps:pe], pc[ps:pe]
                on = ((d[r_, c_][:, None] - d[r_] + margin) > 0) & neg[r_]  # (m, R) active (a, p, n) for each n
                weight[s + r_, c_] += on.sum(1).to(weight.dtype)
                weight[s:e].index_add_(0, r_, -on.to(weight.dtype))
                active += on.sum()
    loss_sum = (weight * dist).sum() + margin * active
    return loss_sum / (active if reduction == "mean_nonzero" else total).clamp(min=1)


# ---------------------------------------------------------------------------------------------------------
# contrastive loss


@_float32_under_autocast
def contrastive_loss(embeddings: Tensor, labels: Tensor | None, pairs: Sequence[Tensor] | None = None, *,
                     pos_margin: float = 0.0, neg_margin: float = 1.0, distance: str = "euclidean",
                     reduction: str = "mean_nonzero", ref_embeddings: Tensor | None = None,
                     ref_labels: Tensor | None = None, exclude_self: bool | None = None,
                     chunk_size: int | None = None) -> Tensor:
    """(B, D), (B,) -> scalar: mean over positive pairs of relu(d - pos_margin) plus mean over negative pairs
    of relu(neg_margin - d) (Hadsell, Chopra & LeCun 2006, in PML's hinge form on plain, unsquared distances).

    `pairs=(pos_anchors, positives, neg_anchors, negatives)` from a miner, or a triplet tuple (a, p, n), read
    as the pairs (a, p) and (a, n); without them every pair of the batch (against the reference) counts.
    Each half is reduced on its own ("mean_nonzero": over its nonzero terms, PML's default) and the halves
    are added, as in PML's `ContrastiveLoss`. With distance="cosine" (d = 1 - cos), PML's margins on
    `CosineSimilarity` are 1 - these. The all-pairs path works in (rows, R) chunks; both are compile-clean.
    """
    _check_choice("distance", distance, DISTANCES)
    _check_choice("reduction", reduction, REDUCTIONS)
    _check_number("pos_margin", pos_margin)
    _check_number("neg_margin", neg_margin)
    emb, labels, ref, ref_labels, exclude_self = _resolve_reference(
        embeddings, labels, ref_embeddings, ref_labels, exclude_self, need_labels=pairs is None)
    same_ref = ref is emb
    emb = _prepare(emb, distance)
    ref = emb if same_ref else _prepare(ref, distance)

    if pairs is not None:
        idx = _check_indices(pairs, (3, 4), "pairs")
        a1, p, a2, n = idx if len(idx) == 4 else (idx[0], idx[1], idx[0], idx[2])
        pos_losses = F.relu(_paired_distance(emb[a1], ref[p], distance) - pos_margin)
        neg_losses = F.relu(neg_margin - _paired_distance(emb[a2], ref[n], distance))
        return _reduce(pos_losses, reduction) + _reduce(neg_losses, reduction)

    b, r = emb.shape[0], ref.shape[0]
    sums = [emb.new_zeros(()), emb.new_zeros(())]
    counts = [emb.new_zeros(()), emb.new_zeros(())]
    for s, e in _chunks(b, _chunk_rows(chunk_size, r)):
        d = _distance_rows(emb[s:e], ref, distance)  # (c, R)
        pos, neg = _pair_masks(labels[s:e], ref_labels, s, exclude_self)
        for k, (mask, losses) in enumerate(((pos, F.relu(d - pos_margin)), (neg, F.relu(neg_margin - d)))):
            losses = losses * mask
            sums[k] = sums[k] + losses.sum()
            counts[k] = counts[k] + ((losses > 0) if reduction == "mean_nonzero" else mask).sum()
    return sums[0] / counts[0].clamp(min=1) + sums[1] / counts[1].clamp(min=1)


# ---------------------------------------------------------------------------------------------------------
# multi-similarity loss


def _dense_pair_masks(pairs: Sequence[Tensor], b: int, r: int, device: torch.device) -> tuple[Tensor, Tensor]:
    a1, p, a2, n = pairs if len(pairs) == 4 else (pairs[0], pairs[1], pairs[0], pairs[2])
    pos = torch.zeros(b, r, dtype=torch.bool, device=device)
    neg = torch.zeros(b, r, dtype=torch.bool, device=device)
    pos[a1, p] = True
    neg[a2, n] = True
    return pos, neg


@_float32_under_autocast
def multi_similarity_loss(embeddings: Tensor, labels: Tensor | None, pairs: Sequence[Tensor] | None = None, *,
                          alpha: float = 2.0, beta: float = 50.0, base: float = 0.5, epsilon: float | None = 0.1,
                          ref_embeddings: Tensor | None = None, ref_labels: Tensor | None = None,
                          exclude_self: bool | None = None, chunk_size: int | None = None) -> Tensor:
    """(B, D), (B,) -> scalar multi-similarity loss (Wang et al. 2019) on cosine similarities S.

    Pair mining (the paper's "MS sampling"), per anchor i: a negative j is kept if S_ij + epsilon > the
    smallest positive similarity of i, a positive j if S_ij - epsilon < the largest negative similarity of
    i (so an anchor without negatives keeps no positives and vice versa). `epsilon=None` skips mining.
    The candidates are every pair (or the given `pairs`). Per anchor:
        1/alpha * log(1 + sum_pos exp(-alpha (S_ij - base))) + 1/beta * log(1 + sum_neg exp(beta (S_ij - base)))
    averaged over the B anchors (anchors with nothing mined add 0).

    This is PML's `MultiSimilarityLoss` applied to the pairs of `MultiSimilarityMiner(epsilon)` (its
    "element" mean over all anchors). The authors' code differs in two details: it also drops positives with
    S >= 1 - 1e-5, and an anchor that keeps positives but no negatives (or the reverse) adds 0 there, where
    PML and this function add its one-sided term.
    Works in (rows, R) chunks; mining reads nothing on the host (compile-clean).
    """
    for name, value in (("alpha", alpha), ("beta", beta)):
        _check_number(name, value, low=0, strict=True)
    _check_number("base", base)
    if epsilon is not None:
        _check_number("epsilon", epsilon)
    emb, labels, ref, ref_labels, exclude_self = _resolve_reference(
        embeddings, labels, ref_embeddings, ref_labels, exclude_self, need_labels=pairs is None)
    same_ref = ref is emb
    emb = _prepare(emb, "cosine")
    ref = emb if same_ref else _prepare(ref, "cosine")
    b, r = emb.shape[0], ref.shape[0]
    given = None
    if pairs is not None:
        given = _dense_pair_masks(_check_indices(pairs, (3, 4), "pairs"), b, r, emb.device)

    total = emb.new_zeros(())
    for s, e in _chunks(b, _chunk_rows(chunk_size, r)):
        sim = emb[s:e] @ ref.T  # (c, R) cosine similarities
        pos, neg = (given[0][s:e], given[1][s:e]) if given is not None else _pair_masks(
            labels[s:e], ref_labels, s, exclude_self)
        if epsilon is not None:
            with torch.no_grad():  # mining selects pairs; it carries no gradient
                sd = sim.detach()
                max_neg = sd.masked_fill(~neg, -math.inf).amax(dim=1, keepdim=True)  # -inf without negatives
                min_pos = sd.masked_fill(~pos, math.inf).amin(dim=1, keepdim=True)  # +inf without positives
                pos = pos & (sd - epsilon < max_neg)
                neg = neg & (sd + epsilon > min_pos)
        zero = sim.new_zeros(e - s, 1)  # the "1 +" inside the log, as a logit 0 (keeps rows without pairs at 0)
        pos_term = torch.logsumexp(torch.cat([(-alpha * (sim - base)).masked_fill(~pos, -math.inf), zero], 1), 1)
        neg_term = torch.logsumexp(torch.cat([(beta * (sim - base)).masked_fill(~neg, -math.inf), zero], 1), 1)
        total = total + (pos_term / alpha + neg_term / beta).sum()
    return total / b


# ---------------------------------------------------------------------------------------------------------
# ArcFace / CosFace


class MarginSoftmaxLoss(nn.Module):
    """Additive-margin softmax on class centres: (B, D) embeddings, (B,) labels -> scalar cross-entropy.

    Logits are `scale * cos(theta_j)` between the normalised embedding and the normalised centre of class
    j, with the target class's logit replaced by
    - ArcFace (Deng et al. 2019), kind="arcface": cos(theta + margin), margin in radians (0.5 ~ 28.6 degrees);
    - CosFace (Wang et al. 2018), kind="cosface": cos(theta) - margin (the paper uses 0.35).

    ArcFace's cos(theta + m) stops decreasing once theta + m > pi. Past that threshold (theta > pi - m) the
    target logit becomes cos(theta) - m sin(m), the linear continuation used by InsightFace and PML, so the
    logit keeps decreasing in theta. With `easy_margin=True` the margin applies only where cos(theta) > 0 and
    the plain cos(theta) is used elsewhere (InsightFace's easy margin). theta = acos of the cosine clamped to
    [-1 + 1e-7, 1 - 1e-7]: acos has an infinite derivative at +-1.

    PML mapping: `ArcFaceLoss(num_classes, embedding_size, margin=math.degrees(margin), scale=scale)` (PML's
    margin is in degrees) and `CosFaceLoss(..., margin=margin, scale=scale)`, with PML's `W` equal to
    `self.weight.T`; both average the cross-entropy over the batch. Runs in float32 under autocast.
    """

    def __init__(self, num_classes: int, embedding_dim: int, *, margin: float = 0.5, scale: float = 64.0,
                 kind: str = "arcface", easy_margin: bool = False) -> None:
        super().__init__()
        for name, value, low in (("num_classes", num_classes, 2), ("embedding_dim", embedding_dim, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        _check_choice("kind", kind, MARGIN_KINDS)
        _check_number("margin", margin, low=0)
        _check_number("scale", scale, low=0, strict=True)
        if kind == "arcface" and margin >= math.pi / 2:
            raise ValueError(f"margin must be an angle in radians in [0, pi/2) for ArcFace, got {margin!r}")
        if not isinstance(easy_margin, bool):
            raise ValueError(f"easy_margin must be a bool, got {easy_margin!r}")
        self.num_classes, self.embedding_dim = num_classes, embedding_dim
        self.margin, self.scale, self.kind, self.easy_margin = float(margin), float(scale), kind, easy_margin
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))  # (C, D) class centres
        nn.init.xavier_uniform_(self.weight)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, kind={self.kind!r}, "
                f"margin={self.margin}, scale={self.scale}, easy_margin={self.easy_margin}")

    def _check(self, embeddings: Tensor, labels: Tensor | None) -> None:
        _check_embeddings(embeddings, "embeddings")
        if embeddings.shape[1] != self.embedding_dim:
            raise ValueError(f"embeddings must have width embedding_dim={self.embedding_dim}, got shape "
                             f"{tuple(embeddings.shape)}")
        if labels is not None:
            _check_labels(labels, embeddings.shape[0], "labels")

    def cosine(self, embeddings: Tensor) -> Tensor:
        """(B, D) -> (B, C) cosine between each embedding and each class centre, in float32."""
        self._check(embeddings, None)
        with torch.autocast(embeddings.device.type, enabled=False):
            return F.linear(F.normalize(_float(embeddings), dim=1), F.normalize(_float(self.weight), dim=1))

    def target_logit(self, cos_target: Tensor) -> Tensor:
        """(B,) cosine of the target class -> (B,) its margin-penalised cosine (before scaling)."""
        m = self.margin
        if self.kind == "cosface":
            return cos_target - m
        c = cos_target.clamp(-1 + 1e-7, 1 - 1e-7)
        theta = torch.acos(c)
        with_margin = torch.cos(theta + m)
        if self.easy_margin:
            return torch.where(c > 0, with_margin, c)
        return torch.where(theta <= math.pi - m, with_margin, c - m * math.sin(m))

    def logits(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """(B, D), (B,) -> (B, C) scaled logits with the margin on each row's target class."""
        self._check(embeddings, labels)
        cos = self.cosine(embeddings)
        target = self.target_logit(cos.gather(1, labels[:, None].long()).squeeze(1))  # (B,)
        return self.scale * cos.scatter(1, labels[:, None].long(), target[:, None].to(cos.dtype))

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """(B, D), (B,) -> scalar mean cross-entropy of the margin logits."""
        return F.cross_entropy(self.logits(embeddings, labels), labels.long())
