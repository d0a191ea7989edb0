"""Evaluation of learnt representations on frozen features: weighted k-nearest-neighbour accuracy and a
linear probe, the two protocols of the self-supervised literature (InstDisc / DINO's k-NN, SimCLR's probe).

Features come from `model(images)` (every cvzoo SSL method returns its pooled backbone features there) on
batches normalised with `model.signature`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _check_features(features: object, labels: object, name: str) -> tuple[Tensor, Tensor]:
    if not isinstance(features, Tensor) or features.ndim != 2 or not features.is_floating_point():
        what = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"{name}_features must be a floating (N, D) tensor, got {what}")
    if not isinstance(labels, Tensor) or labels.shape != (features.shape[0],) or labels.is_floating_point():
        what = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"{name}_labels must be an integer ({features.shape[0]},) tensor, got {what}")
    return features, labels.long()


@torch.no_grad()
def extract_features(model: nn.Module, loader: Iterable, device: torch.device | str | None = None
                     ) -> tuple[Tensor, Tensor]:
    """(features (N, D) float32 on the CPU, labels (N,)) of `model(normalised images)` over `loader`'s
    (images in [0, 1], labels) batches, in eval mode (restored afterwards)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    feats, labels = [], []
    try:
        for images, targets in loader:
            feats.append(model(model.signature.normalize(images.to(device))).float().cpu())
            labels.append(torch.as_tensor(targets).cpu())
    finally:
        model.train(was_training)
    if not feats:
        raise ValueError("loader yielded no batches")
    return torch.cat(feats), torch.cat(labels).long()


@torch.no_grad()
def knn_accuracy(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
                 k: int = 20, temperature: float | None = 0.07, chunk_size: int = 1024) -> float:
    """Top-1 accuracy of a k-NN classifier on L2-normalised features (cosine similarity).

    `temperature` set: each of the k neighbours votes exp(similarity / temperature) for its class (Wu et al.
    2018, DINO's evaluation); None: one vote each (ties go to the lower class index). Queries are processed
    `chunk_size` at a time, so memory stays (chunk_size, N_train). Passing the same tensors as train and
    test evaluates leave-one-out (a labelled set scored on itself, each image excluded from its neighbours).
    """
    train_features, train_labels = _check_features(train_features, train_labels, "train")
    test_features, test_labels = _check_features(test_features, test_labels, "test")
    leave_one_out = test_features is train_features
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"train and test features differ in dimension: {train_features.shape[1]} and "
                         f"{test_features.shape[1]}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= train_features.shape[0]:
        raise ValueError(f"k must be an int in [1, {train_features.shape[0]}] (the training set size), got {k!r}")
    if temperature is not None and not temperature > 0:
        raise ValueError(f"temperature must be positive or None, got {temperature!r}")
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    correct = 0
    for start in range(0, test.shape[0], chunk_size):
        sim = test[start:start + chunk_size] @ train.T  # (q, N)
        if leave_one_out:  # the query itself is not its own neighbour
            rows = torch.arange(sim.shape[0])
            sim[rows, rows + start] = -float("inf")
        sim, idx = sim.topk(k, dim=1)  # (q, k)
        weights = torch.ones_like(sim) if temperature is None else (sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes).scatter_add_(1, train_labels[idx], weights)  # (q, K)
        correct += int((votes.argmax(1) == test_labels[start:start + chunk_size]).sum())
    return correct / test.shape[0]


def linear_probe_accuracy(train_features: Tensor, train_labels: Tensor, test_features: Tensor,
                          test_labels: Tensor, *, epochs: int = 100, lr: float = 0.1, weight_decay: float = 1e-4,
                          seed: int = 0) -> float:
    """Top-1 test accuracy of a linear classifier trained on frozen features (standardised with the training
    set's mean and std): full-batch L-BFGS on the cross-entropy with an L2 penalty `weight_decay`, at most
    `epochs` iterations. Deterministic for a given `seed`."""
    train_features, train_labels = _check_features(train_features, train_labels, "train")
    test_features, test_labels = _check_features(test_features, test_labels, "test")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    mean, std = train_features.mean(0), train_features.std(0).clamp(min=1e-6)
    x, xt = (train_features - mean) / std, (test_features - mean) / std
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    g = torch.Generator().manual_seed(seed)
    probe = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        probe.weight.copy_(torch.randn(probe.weight.shape, generator=g) * 0.01)
        probe.bias.zero_()
    optimizer = torch.optim.LBFGS(probe.parameters(), lr=lr, max_iter=epochs, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(x), train_labels) + weight_decay * probe.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return float((probe(xt).argmax(1) == test_labels).float().mean())
