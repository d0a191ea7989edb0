"""Prototypical networks (Snell et al. 2017): a class is the mean embedding of its support images; a query is
scored by its (negative squared Euclidean, or scaled cosine) similarity to each prototype."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvzoo.adapt._checks import check_positive_int, pooled_features
from cvzoo.adapt.episodes import episode_labels
from cvzoo.backbones.base import last_map_channels
from cvzoo.types import cast_like_parameters

DISTANCES = ("euclidean", "cosine")
POOLS = ("avg", "flatten")


def class_prototypes(support: Tensor, support_labels: Tensor, n_way: int) -> Tensor:
    """(S, D) embeddings, (S,) labels in [0, n_way) -> (n_way, D) mean embedding of each class (any order,
    any number of shots; a class without support images gets the zero vector)."""
    one_hot = F.one_hot(support_labels, n_way).to(support.dtype)  # (S, N)
    counts = one_hot.sum(0).clamp(min=1)  # (N,)
    return (one_hot.t() @ support) / counts[:, None]


def prototype_logits(queries: Tensor, prototypes: Tensor, distance: str = "euclidean", scale: float = 1.0) -> Tensor:
    """(Q, D), (N, D) -> (Q, N): -||q - p||^2 (euclidean) or scale * cos(q, p) (cosine)."""
    if distance == "euclidean":
        # |q|^2 - 2 q.p + |p|^2 with the |q|^2 term kept: the logits are the true negative squared distances
        return -(queries.pow(2).sum(-1, keepdim=True) - 2 * queries @ prototypes.t() + prototypes.pow(2).sum(-1))
    if distance == "cosine":
        return scale * F.normalize(queries, dim=-1) @ F.normalize(prototypes, dim=-1).t()
    raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")


class ProtoNet(nn.Module):
    """(B, C, H, W) normalised images -> (B, D) embeddings: the backbone's last map averaged over space
    (`pool="avg"`, D = its channels, or `embedding_dim` after a linear projection when set), or flattened
    (`pool="flatten"`, D = channels x h x w: the spatial layout is kept, which matters for small images such
    as digits; the width then depends on the input size).

    `loss(images, labels)` takes episodic batches (see `cvzoo.adapt.episodes`): `tasks` episodes of
    `n_way` x (`k_shot` + `query`) images with labels relabelled 0..n_way-1, returning {"loss": query cross
    entropy, "accuracy": query accuracy}. `predict(support, support_labels, queries)` classifies queries of any
    episode size.
    """

    def __init__(self, backbone: nn.Module, *, n_way: int = 5, k_shot: int = 1, query: int = 5,
                 distance: str = "euclidean", scale: float = 10.0, embedding_dim: int | None = None,
                 pool: str = "avg") -> None:
        super().__init__()
        dim = last_map_channels(backbone, "ProtoNet")
        for name, value in (("n_way", n_way), ("k_shot", k_shot), ("query", query)):
            check_positive_int(name, value)
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"scale must be a positive number (the cosine logits' temperature), got {scale!r}")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if pool == "flatten" and embedding_dim is not None:
            raise ValueError("embedding_dim (a linear projection) needs pool='avg': a flattened map's width depends "
                             "on the input size")
        self.pool = pool
        self.backbone = backbone
        self.projection = nn.Identity() if embedding_dim is None else nn.Linear(dim, check_positive_int(
            "embedding_dim", embedding_dim))
        # None with pool="flatten": the width depends on the input size
        self.embedding_dim = None if pool == "flatten" else dim if embedding_dim is None else embedding_dim
        self.n_way, self.k_shot, self.query = n_way, k_shot, query
        self.distance, self.scale = distance, float(scale)
        self.signature = backbone.signature.replace(outputs=("embeddings",))

    def forward(self, images: Tensor) -> Tensor:
        images = cast_like_parameters(self.signature.validate(images), self)
        if self.pool == "flatten":
            return self.backbone(images)[-1].flatten(1)  # (B, C * h * w)
        return self.projection(pooled_features(self.backbone, images))

    def episode_logits(self, embeddings: Tensor) -> Tensor:
        """(T * N * (K + Q), D) embeddings in the episode layout -> (T, N * Q, N) query logits."""
        n, k = self.n_way, self.k_shot
        per_task = n * (k + self.query)
        emb = embeddings.float().view(-1, per_task, embeddings.shape[-1])  # (T, N(K+Q), D)
        support = emb[:, :n * k].reshape(emb.shape[0], n, k, -1).mean(2)  # (T, N, D): class-major support blocks
        queries = emb[:, n * k:]  # (T, NQ, D)
        if self.distance == "euclidean":
            return -torch.cdist(queries, support).pow(2)
        return self.scale * F.normalize(queries, dim=-1) @ F.normalize(support, dim=-1).transpose(1, 2)

    def loss(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        per_task = self.n_way * (self.k_shot + self.query)
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[0] % per_task:
            raise ValueError(f"images must be episodic batches of {self.n_way}-way {self.k_shot}-shot episodes with "
                             f"{self.query} queries a class: (T * {per_task}, C, H, W), got "
                             f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
        tasks = images.shape[0] // per_task
        expected = episode_labels(self.n_way, self.k_shot, self.query, tasks=tasks, device=images.device)
        if not isinstance(labels, Tensor) or labels.shape != expected.shape:
            raise ValueError(f"labels must be the episode labels of shape {tuple(expected.shape)} "
                             f"(cvzoo.adapt.EpisodeCollate), got "
                             f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")
        if not torch.compiler.is_compiling() and not torch.equal(labels.to(expected.device), expected):
            raise ValueError("labels do not follow the episode layout (support blocks then query blocks, classes "
                             "relabelled 0..n_way-1); collate episodes with cvzoo.adapt.EpisodeCollate")
        logits = self.episode_logits(self(images))  # (T, NQ, N)
        query_labels = expected.view(tasks, per_task)[:, self.n_way * self.k_shot:]  # (T, NQ)
        loss = F.cross_entropy(logits.flatten(0, 1), query_labels.flatten())
        accuracy = (logits.argmax(-1) == query_labels).float().mean()
        return {"loss": loss, "accuracy": accuracy.detach()}

    @torch.no_grad()
    def predict(self, support: Tensor, support_labels: Tensor, queries: Tensor) -> Tensor:
        """Support images (S, C, H, W) with labels (S,) in [0, N), query images (Q, C, H, W) -> (Q,) labels."""
        n_way = int(support_labels.max()) + 1
        prototypes = class_prototypes(self(support).float(), support_labels.long(), n_way)
        return prototype_logits(self(queries).float(), prototypes, self.distance, self.scale).argmax(-1)
