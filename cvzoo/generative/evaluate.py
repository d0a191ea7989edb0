"""Sample quality measured by a separately trained classifier: class agreement and a Frechet distance on
its features (torchmetrics' FID with a custom feature extractor).

The classifier is any task model with `signature` (its input normalisation), `predict(images).labels` and
`features(images) -> (N, D)` (cvzoo's `ImageClassifier`). Images here are in [0, 1], as `sample` returns them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from cvzoo._optional import require


def _check_images(images: object, name: str) -> Tensor:
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        what = f"shape {tuple(images.shape)}, dtype {images.dtype}" if isinstance(images, Tensor) \
            else type(images).__name__
        raise ValueError(f"{name} must be floating (N, C, H, W) images in [0, 1], got {what}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is empty; expected at least one image")
    return images


class ClassifierFeatures(nn.Module):
    """Images in [0, 1] (N, C, H, W) -> `classifier.features` of the normalised images (N, D), float32.

    The feature extractor torchmetrics' `FrechetInceptionDistance(feature=...)` takes: it reads
    `num_features`, found by one forward of a (1, C, image_size, image_size) image.
    """

    def __init__(self, classifier: nn.Module, image_size: int) -> None:
        super().__init__()
        for attr in ("signature", "features"):
            if not hasattr(classifier, attr):
                raise ValueError(f"classifier must have `{attr}` (a cvzoo ImageClassifier), got "
                                 f"{type(classifier).__name__}")
        self.classifier = classifier
        device = next(classifier.parameters()).device
        with torch.no_grad():
            dummy = torch.zeros(1, classifier.signature.in_channels, image_size, image_size, device=device)
            self.num_features = int(self(dummy).shape[-1])

    def forward(self, images: Tensor) -> Tensor:
        was_training = self.classifier.training
        self.classifier.eval()
        try:
            return self.classifier.features(self.classifier.signature.normalize(images)).float()
        finally:
            self.classifier.train(was_training)


@torch.no_grad()
def class_agreement(classifier: nn.Module, samples: Tensor, labels: Tensor, batch_size: int = 256) -> float:
    """The fraction of `samples` (N, C, H, W) in [0, 1] that `classifier` assigns to the requested `labels` (N,)."""
    samples = _check_images(samples, "samples")
    if not isinstance(labels, Tensor) or labels.shape != (samples.shape[0],):
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a ({samples.shape[0]},) tensor, one per sample, got {shape}")
    device = next(classifier.parameters()).device
    was_training = classifier.training
    classifier.eval()
    try:
        hits = 0
        for start in range(0, samples.shape[0], batch_size):
            chunk = classifier.signature.normalize(samples[start:start + batch_size].to(device))
            predicted = classifier.predict(chunk).labels.cpu()
            hits += int((predicted == labels[start:start + batch_size].cpu()).sum())
    finally:
        classifier.train(was_training)
    return hits / samples.shape[0]


@torch.no_grad()
def frechet_distance(features: nn.Module, real: Tensor | Iterable[Tensor], fake: Tensor | Iterable[Tensor],
                     batch_size: int = 256) -> float:
    """Frechet distance between the Gaussians fitted to `features` of `real` and of `fake` images in [0, 1]
    (torchmetrics' FrechetInceptionDistance with `features` as its extractor). Either set is a (N, C, H, W)
    tensor or an iterable of such batches; each needs at least two images."""
    fid_module = require("torchmetrics.image.fid", "metrics", "Frechet distances")
    metric = fid_module.FrechetInceptionDistance(feature=features, normalize=True)
    device = next(features.parameters()).device
    metric = metric.to(device)
    for images, is_real, name in ((real, True, "real"), (fake, False, "fake")):
        batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)] \
            if isinstance(images, Tensor) else images
        count = 0
        for batch in batches:
            batch = _check_images(batch, name)
            metric.update(batch.to(device), real=is_real)
            count += batch.shape[0]
        if count < 2:
            raise ValueError(f"{name} holds {count} image(s); a Frechet distance needs at least 2")
    return float(metric.compute())
