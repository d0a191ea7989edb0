"""Contrastive self-supervised learning: SimCLR's NT-Xent and MoCo's InfoNCE losses, and the SimCLR and MoCo
(v2, v3) task models.

Both losses compare L2-normalised projections by cosine similarity divided by a temperature, and run in at
least float32 (under autocast too). Under data parallelism the negatives span the global batch: each rank
all-gathers the projections (`gather_with_grad`) and computes the loss of its own anchors against them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvzoo.backbones.base import last_map_channels
from cvzoo.ssl.gather import gather_with_grad, rank_and_world
from cvzoo.ssl.heads import MLPHead
from cvzoo.ssl.method import _MomentumMixin, _pool, _ViewsMixin
from cvzoo.ssl.momentum import momentum_copy
from cvzoo.ssl.views import TwoViews, ssl_augmentation


def _check_temperature(temperature: object) -> float:
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0
            or not math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return float(temperature)


def _check_pair(name_a: str, a: object, name_b: str, b: object) -> None:
    """Static checks (compile-clean): two floating (B, D) tensors of one shape, B >= 1."""
    for name, t in ((name_a, a), (name_b, b)):
        if not isinstance(t, Tensor) or t.ndim != 2 or not t.is_floating_point():
            got = f"shape {tuple(t.shape)} dtype {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a floating (B, D) tensor, got {got}")
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same (B, D) shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if a.shape[0] == 0:
        raise ValueError(f"{name_a} is an empty batch (shape {tuple(a.shape)}); expected at least one row")


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # float32 under autocast, float64 stays float64


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float = 0.5, gather: bool = True) -> Tensor:
    """SimCLR's normalised-temperature cross entropy (Chen et al. 2020). z1, z2 (B, D) projections of two views
    of the same B images -> scalar.

    With the 2N rows of both views of the global batch L2-normalised, the loss of anchor i with positive p(i)
    (its other view) is `-log(exp(s_ip / t) / sum_{k != i} exp(s_ik / t))`, s the cosine similarity: the
    positive against the other 2N - 2 rows as negatives. The result is symmetric in the views and the mean
    over the 2B local anchors.

    Data parallel convention (`gather=True` under an initialised process group of world size W > 1, equal B on
    every rank, N = W * B): both views are all-gathered with gradients and each rank returns the mean over its
    own 2B anchors, compared with all 2N gathered rows. Then the mean of the W ranks' losses is the loss of the
    combined batch, and a rank's `loss.backward()` gives its rows W times their gradient in the combined-batch
    loss (the all-gather's backward adds what every rank's loss sends to them), so DDP's averaging of
    parameter gradients over ranks yields exactly the combined-batch gradient. `gather=False` keeps the
    negatives local (the loss of each rank's own batch).

    Raises ValueError for temperature <= 0, shape mismatches and a global batch of 1 (no negatives).
    """
    t = _check_temperature(temperature)
    _check_pair("z1", z1, "z2", z2)
    rank, world = rank_and_world() if gather else (0, 1)
    b = z1.shape[0]
    if b * world < 2:
        raise ValueError(f"nt_xent_loss needs a global batch of at least 2 images (the negatives are the other "
                         f"images), got batch size {b * world} ({b} per rank x {world} ranks)")
    dtype = _compute_dtype(z1)
    local = F.normalize(torch.cat([z1, z2]).to(dtype), dim=1)  # (2B, D): view 1 rows, then view 2 rows
    keys = gather_with_grad(local) if world > 1 else local  # (2N, D): rank blocks [view 1; view 2], rank order
    offset = 2 * b * rank  # where this rank's block starts among the keys
    idx = torch.arange(2 * b, device=local.device)
    positives = offset + (idx + b) % (2 * b)  # (2B,): view-1 row i <-> view-2 row i of the same block
    logits = local @ keys.T / t  # (2B, 2N)
    self_mask = torch.arange(keys.shape[0], device=local.device) == (offset + idx)[:, None]
    logits = logits.masked_fill(self_mask, float("-inf"))  # a row is never its own negative
    return F.cross_entropy(logits, positives)


def info_nce_loss(query: Tensor, keys: Tensor, queue: Tensor | None = None, temperature: float = 0.2,
                  gather: bool = True) -> Tensor:
    """MoCo's InfoNCE (He et al. 2020; Chen et al. 2021). query, keys (B, D), queue (K, D) or None -> scalar.

    Rows are L2-normalised (the queue's too) and compared by cosine similarity / temperature; the positive of
    query i is keys[i]. Returns the mean over the B queries of the cross entropy against:

    - MoCo v2 (`queue` given): the positive and the K queue rows as negatives, logits (B, 1 + K);
    - MoCo v3 (`queue=None`): all N keys of the global batch (gathered with gradients across ranks, as
      `nt_xent_loss` does, under the same data parallel convention: the mean of the ranks' losses is the
      combined-batch loss and a rank's gradients are W times the combined-batch gradients of its rows), the
      other N - 1 keys being the negatives, logits (B, N).

    MoCo v3's reference code multiplies this by 2 * temperature; this function does not (a constant scale).
    Raises ValueError for temperature <= 0, shape mismatches and, without a queue, a global batch of 1.
    """
    t = _check_temperature(temperature)
    _check_pair("query", query, "keys", keys)
    dtype = _compute_dtype(query)
    q = F.normalize(query.to(dtype), dim=1)
    k = F.normalize(keys.to(dtype), dim=1)
    b = q.shape[0]
    if queue is not None:
        if (not isinstance(queue, Tensor) or queue.ndim != 2 or queue.shape[0] < 1
                or queue.shape[1] != q.shape[1]):
            got = tuple(queue.shape) if isinstance(queue, Tensor) else type(queue).__name__
            raise ValueError(f"queue must be a (K, {q.shape[1]}) tensor with K >= 1 or None, got {got}")
        negatives = F.normalize(queue.to(dtype), dim=1)
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ negatives.T], dim=1) / t  # (B, 1 + K)
        return F.cross_entropy(logits, torch.zeros(b, dtype=torch.long, device=q.device))
    rank, world = rank_and_world() if gather else (0, 1)
    if b * world < 2:
        raise ValueError(f"info_nce_loss without a queue needs a global batch of at least 2 (the negatives are the "
                         f"other keys), got batch size {b * world} ({b} per rank x {world} ranks)")
    all_keys = gather_with_grad(k) if world > 1 else k  # (N, D) in rank order
    logits = q @ all_keys.T / t  # (B, N)
    return F.cross_entropy(logits, torch.arange(b, device=q.device) + b * rank)


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


class _TwoViewMethod(_ViewsMixin, nn.Module):
    """What SimCLR and MoCo share: the backbone, its signature and pooled features, and the two views built
    from a normalised batch inside `loss` (`_ViewsMixin`, with the global-batch check of in-batch negatives)."""

    def __init__(self, backbone: nn.Module, views: nn.Module | None, image_size: int | tuple[int, int] | None,
                 owner: str) -> None:
        super().__init__()
        self.feature_dim: int = last_map_channels(backbone, owner)
        if views is not None and not isinstance(views, nn.Module):
            raise ValueError(f"views must be an nn.Module returning two views, or None, got {type(views).__name__}")
        self.backbone = backbone
        self._init_views(backbone, views, image_size)

    def _default_views(self, size: tuple[int, int]) -> nn.Module:
        return TwoViews(ssl_augmentation(size))

    def forward(self, images: Tensor) -> Tensor:
        """(B, C, H, W) normalised images -> the backbone's pooled features (B, feature_dim)."""
        return _pool(self.backbone, images)

    def _two_views(self, images: Tensor, min_global_batch: int) -> tuple[Tensor, Tensor]:
        """Normalised (B, C, H, W) -> two normalised augmented views, from the images in [0, 1]."""
        world = rank_and_world()[1]
        if isinstance(images, Tensor) and images.ndim == 4 and images.shape[0] * world < min_global_batch:
            b = images.shape[0]
            raise ValueError(f"{type(self).__name__} needs a global batch of at least {min_global_batch} images "
                             f"(the negatives are the other images), got batch size {b * world} ({b} per rank x "
                             f"{world} ranks)")
        v1, v2 = self._make_views(images, min_batch=1, num_views=2)
        return v1, v2


class SimCLR(_TwoViewMethod):
    """SimCLR (Chen et al. 2020): pooled backbone features -> MLP projection -> NT-Xent between two views.

    `forward(images)`: (B, C, H, W) normalised -> pooled features (B, feature_dim), the embedding kept after
    pre-training. `loss(images, targets=None)`: maps the normalised batch back to [0, 1] with the backbone's
    signature, draws two views with `views` (default `TwoViews(ssl_augmentation(image_size or the input
    size))`), normalises them again, runs both through backbone and projector as one batch of 2B and returns
    {"loss": nt_xent_loss(z1, z2, temperature)}; `targets` are ignored. Under DDP the negatives are the global
    batch (see `nt_xent_loss` for the gradient convention). The projector is `MLPHead(feature_dim,
    hidden_dim, projection_dim)`: Linear-BN-ReLU-Linear.
    """

    def __init__(self, backbone: nn.Module, *, projection_dim: int = 128, hidden_dim: int = 512,
                 temperature: float = 0.5, views: nn.Module | None = None,
                 image_size: int | tuple[int, int] | None = None) -> None:
        super().__init__(backbone, views, image_size, "SimCLR")
        _check_positive_int("projection_dim", projection_dim)
        _check_positive_int("hidden_dim", hidden_dim)
        self.temperature = _check_temperature(temperature)
        self.projector = MLPHead(self.feature_dim, hidden_dim, projection_dim, num_layers=2)

    def loss(self, images: Tensor, targets: object = None) -> dict[str, Tensor]:
        """(B, C, H, W) normalised images -> {"loss": scalar}."""
        x1, x2 = self._two_views(images, min_global_batch=2)
        b = x1.shape[0]
        if x1.shape == x2.shape:  # one pass over 2B images (BatchNorm sees both views, as in SimCLR)
            z = self.projector(self(torch.cat([x1, x2])))  # (2B, projection_dim)
            z1, z2 = z[:b], z[b:]
        else:
            z1, z2 = self.projector(self(x1)), self.projector(self(x2))
        return {"loss": nt_xent_loss(z1, z2, self.temperature)}


class MoCo(_MomentumMixin, _TwoViewMethod):
    """Momentum contrast: MoCo v2 (Chen et al. 2020) and MoCo v3 (Chen, Xie & He 2021), symmetrised.

    The query encoder is `backbone` + `projector` (+ `predictor` for v3); the key encoder (`target_backbone`,
    `target_projector`) is a frozen momentum copy, updated at the start of every training-mode `loss` call by
    `target <- m * target + (1 - m) * online`, m = `momentum` or, with `max_steps`, the cosine schedule from
    `momentum` to `final_momentum` over `max_steps` read from the `step` buffer (incremented by each
    training-mode `loss`). Keys are computed without gradients.

    - version 2: projector Linear-ReLU-Linear; negatives are the `queue` buffer (queue_size, projection_dim) of
      normalised keys from earlier steps. After the loss, a training-mode call pushes this step's keys (both
      views, all-gathered across ranks) in FIFO order at `queue_ptr` (wrapping around; if there are more keys
      than `queue_size` only the newest stay). The queue starts as random unit vectors.
    - version 3: projector Linear-BN-ReLU-Linear-BN (no affine), predictor Linear-BN-ReLU-Linear on the query
      branch; negatives are the other keys of the global batch (no queue).

    `loss(images, targets=None)` builds two views as `SimCLR` does and returns {"loss": (info_nce(q1, k2) +
    info_nce(q2, k1)) / 2} (`info_nce_loss`); `forward(images)` returns the pooled features (B, feature_dim).
    """

    def __init__(self, backbone: nn.Module, *, version: int = 2, projection_dim: int = 128, hidden_dim: int = 512,
                 queue_size: int = 4096, temperature: float = 0.2, momentum: float = 0.99,
                 final_momentum: float = 1.0, max_steps: int | None = None, views: nn.Module | None = None,
                 image_size: int | tuple[int, int] | None = None) -> None:
        super().__init__(backbone, views, image_size, "MoCo")
        if isinstance(version, bool) or version not in (2, 3):
            raise ValueError(f"version must be 2 (queue) or 3 (in-batch negatives, predictor), got {version!r}")
        _check_positive_int("projection_dim", projection_dim)
        _check_positive_int("hidden_dim", hidden_dim)
        self.temperature = _check_temperature(temperature)
        for name, value in (("momentum", momentum), ("final_momentum", final_momentum)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        if max_steps is not None:
            _check_positive_int("max_steps", max_steps)
        self.version = int(version)
        self.base_momentum, self.final_momentum, self.max_steps = float(momentum), float(final_momentum), max_steps
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        if self.version == 2:
            self.projector = MLPHead(self.feature_dim, hidden_dim, projection_dim, num_layers=2, norm_layer=None)
            self.predictor = None
            _check_positive_int("queue_size", queue_size)
            self.register_buffer("queue", F.normalize(torch.randn(queue_size, projection_dim), dim=1))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        else:
            self.projector = MLPHead(self.feature_dim, hidden_dim, projection_dim, num_layers=2, last_norm=True)
            self.predictor = MLPHead(projection_dim, hidden_dim, projection_dim, num_layers=2)
            self.queue = self.queue_ptr = None
        self.target_backbone = momentum_copy(self.backbone)
        self.target_projector = momentum_copy(self.projector)

    @torch.no_grad()
    def update_target(self) -> None:
        """One momentum step of the key encoder towards the query encoder, and `step += 1`."""
        self._step_momentum([(self.backbone, self.target_backbone), (self.projector, self.target_projector)])

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """(n, projection_dim) keys of this rank -> L2-normalised, all-gathered (rank order) and written to the
        queue at `queue_ptr`, wrapping around; `queue_ptr` advances by the gathered count modulo queue_size."""
        if self.queue is None:
            raise ValueError("enqueue needs MoCo version 2 (version 3 has no queue)")
        keys = F.normalize(gather_with_grad(keys.detach()).to(self.queue.dtype), dim=1)  # (n_all, D)
        size, n = self.queue.shape[0], keys.shape[0]
        start = self.queue_ptr + max(n - size, 0)  # more keys than slots: only the newest `size` survive
        keys = keys[-size:]
        idx = (start + torch.arange(keys.shape[0], device=keys.device)) % size  # distinct slots, FIFO order
        self.queue.index_copy_(0, idx, keys)
        self.queue_ptr.copy_((self.queue_ptr + n) % size)

    def _query(self, x: Tensor) -> Tensor:
        q = self.projector(self(x))
        return q if self.predictor is None else self.predictor(q)

    @torch.no_grad()
    def _key(self, x: Tensor) -> Tensor:
        return self.target_projector(_pool(self.target_backbone, x))

    def loss(self, images: Tensor, targets: object = None) -> dict[str, Tensor]:
        """(B, C, H, W) normalised images -> {"loss": scalar}. Training mode also updates the key encoder (before)
        and the queue (after)."""
        x1, x2 = self._two_views(images, min_global_batch=1 if self.version == 2 else 2)
        if self.training:
            self.update_target()
        q1, q2 = self._query(x1), self._query(x2)
        k1, k2 = self._key(x1), self._key(x2)
        if self.queue is None:
            loss = (info_nce_loss(q1, k2, None, self.temperature) + info_nce_loss(q2, k1, None, self.temperature)) / 2
            return {"loss": loss}
        queue = self.queue.clone()  # the negatives of this step; the buffer is overwritten below
        loss = (info_nce_loss(q1, k2, queue, self.temperature) + info_nce_loss(q2, k1, queue, self.temperature)) / 2
        if self.training:
            self.enqueue(torch.cat([k1, k2]))
        return {"loss": loss}
