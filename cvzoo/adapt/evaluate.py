"""Few-shot evaluation on held-out classes, its nearest-neighbour baseline, and the probe that asks how much of
a nuisance attribute a representation still carries."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from cvzoo.adapt.episodes import EpisodicBatchSampler, episode_labels

# support images (S, C, H, W), support labels (S,) in [0, N), query images (Q, C, H, W) -> query labels (Q,)
EpisodePredictor = Callable[[Tensor, Tensor, Tensor], Tensor]


def _dataset_labels(dataset: Dataset) -> Tensor:
    labels = getattr(dataset, "labels", None)
    if isinstance(labels, Tensor):
        return labels.long()
    return torch.stack([torch.as_tensor(dataset[i][1]) for i in range(len(dataset))]).long()  # type: ignore[arg-type]


@torch.no_grad()
def few_shot_accuracy(predict: EpisodePredictor, dataset: Dataset, *, n_way: int = 5, k_shot: int = 1,
                      query: int = 15, episodes: int = 200, classes: Sequence[int] | None = None, seed: int = 0,
                      transform: Callable[[Tensor], Tensor] | None = None, device: torch.device | str = "cpu"
                      ) -> tuple[float, float]:
    """(mean query accuracy, 95% confidence half-width) over `episodes` N-way K-shot episodes drawn from
    `classes` of `dataset` (samples `(image, label)`), the usual few-shot report (mean +- 1.96 std / sqrt(E)).

    `predict(support, support_labels, queries)` is e.g. `ProtoNet.predict`, `MAML.predict` or
    `nearest_neighbour_predictor(encoder)`; `transform` normalises the [0, 1] images for the model.
    """
    sampler = EpisodicBatchSampler(_dataset_labels(dataset), n_way, k_shot, query, episodes, classes=classes,
                                   seed=seed)
    labels = episode_labels(n_way, k_shot, query, device=device)
    split = n_way * k_shot
    accuracies = []
    for indices in sampler:
        images = torch.stack([dataset[i][0] for i in indices]).to(device)
        images = transform(images) if transform is not None else images
        predicted = predict(images[:split], labels[:split], images[split:])
        accuracies.append(float((predicted.to(device) == labels[split:]).float().mean()))
    acc = torch.tensor(accuracies)
    half_width = 1.96 * float(acc.std()) / math.sqrt(len(acc)) if len(acc) > 1 else float("nan")
    return float(acc.mean()), half_width


def nearest_neighbour_predictor(encoder: Callable[[Tensor], Tensor]) -> EpisodePredictor:
    """The baseline: each query takes the label of its nearest support image (cosine similarity) in the space
    of `encoder(images) -> (B, D)` features (e.g. a randomly initialised backbone, pooled)."""

    @torch.no_grad()
    def predict(support: Tensor, support_labels: Tensor, queries: Tensor) -> Tensor:
        s = torch.nn.functional.normalize(encoder(support).float().flatten(1), dim=-1)
        q = torch.nn.functional.normalize(encoder(queries).float().flatten(1), dim=-1)
        return support_labels[(q @ s.t()).argmax(-1)]

    return predict


def attribute_probe_accuracy(features: Tensor, attribute: Tensor, *, train_fraction: float = 0.5, hidden_dim: int = 0,
                             steps: int = 300, lr: float = 1e-2, seed: int = 0) -> float:
    """How well a fresh classifier reads `attribute` (N,) int from frozen `features` (N, D): trained on a seeded
    `train_fraction` of the rows, accuracy on the rest. `hidden_dim` 0 is a linear probe, else an MLP of that
    width (a stronger reader). Full-batch Adam on standardised features."""
    if not isinstance(features, Tensor) or features.ndim != 2 or not isinstance(attribute, Tensor) or \
            attribute.shape != features.shape[:1]:
        raise ValueError(f"features must be (N, D) and attribute (N,), got "
                         f"{getattr(features, 'shape', type(features).__name__)} and "
                         f"{getattr(attribute, 'shape', type(attribute).__name__)}")
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction!r}")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(features.shape[0], generator=g)
    cut = int(round(train_fraction * features.shape[0]))
    train, test = order[:cut], order[cut:]
    x = features.float()
    mean, std = x[train].mean(0), x[train].std(0).clamp(min=1e-6)
    x = (x - mean) / std
    y = attribute.long()
    classes = int(y.max()) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe: nn.Module = nn.Linear(x.shape[1], classes) if hidden_dim == 0 else nn.Sequential(
            nn.Linear(x.shape[1], hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, classes))
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=1e-4)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(probe(x[train]), y[train]).backward()
            optimizer.step()
    with torch.no_grad():
        return float((probe(x[test]).argmax(-1) == y[test]).float().mean())
