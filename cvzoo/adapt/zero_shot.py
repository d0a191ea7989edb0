"""Zero-shot classification heads: classes given by prototype vectors instead of trained weights, so classes
never seen in training can be scored. Prototypes come from text (a CLIP model's class-name embeddings) or from
attribute vectors ("has stripes", "is red", ...: Lampert et al.'s attribute-based recipe, trained as in
DeViSE/ESZSL with a learnt projection of the image features into attribute space).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvzoo.adapt._checks import check_positive_int

METRICS = ("cosine", "dot")


def _check_prototypes(prototypes: object, name: str = "prototypes") -> Tensor:
    if not isinstance(prototypes, Tensor) or prototypes.ndim != 2 or not prototypes.is_floating_point() or min(
            prototypes.shape) < 1:
        got = (f"shape {tuple(prototypes.shape)} dtype {prototypes.dtype}" if isinstance(prototypes, Tensor)
               else type(prototypes).__name__)
        raise ValueError(f"{name} must be a floating (K, A) tensor, one row per class, got {got}")
    return prototypes


class ZeroShotHead(nn.Module):
    """(B, D) features -> (B, K) logits against K class prototypes (K, A).

    `projection` maps features into the prototypes' space (A); None means the features already live there
    (CLIP image embeddings against CLIP text embeddings). `metric="cosine"` scores `scale * cos(z, p)`
    (the CLIP convention; `scale` 100 for CLIP's zero-shot evaluation), `"dot"` scores `z . p`. Prototypes are
    a buffer: training on seen classes learns only the projection, and `set_classes` swaps in the prototypes of
    unseen classes for testing.
    """

    def __init__(self, prototypes: Tensor, *, projection: nn.Module | None = None, metric: str = "cosine",
                 scale: float = 10.0, classnames: Sequence[str] | None = None) -> None:
        super().__init__()
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"scale must be a positive number, got {scale!r}")
        self.projection = nn.Identity() if projection is None else projection
        self.metric, self.scale = metric, float(scale)
        self.register_buffer("prototypes", torch.empty(0))
        self.set_classes(prototypes, classnames)

    def set_classes(self, prototypes: Tensor, classnames: Sequence[str] | None = None) -> ZeroShotHead:
        """Replaces the classes (e.g. seen -> unseen); the prototypes' width must stay the same. Returns self."""
        prototypes = _check_prototypes(prototypes)
        if self.prototypes.numel() and prototypes.shape[1] != self.prototypes.shape[1]:
            raise ValueError(f"prototypes must keep width {self.prototypes.shape[1]} (the projection's output), got "
                             f"{prototypes.shape[1]}")
        if classnames is not None and len(classnames) != prototypes.shape[0]:
            raise ValueError(f"classnames has {len(classnames)} names for {prototypes.shape[0]} prototypes")
        self.prototypes = prototypes.detach().clone().to(self.prototypes.device)
        self.num_classes = prototypes.shape[0]
        self.classnames = tuple(classnames) if classnames is not None else None
        return self

    @classmethod
    def from_text(cls, model: nn.Module, tokenizer: Callable[[list[str]], Tensor] | None, classnames: Sequence[str],
                  templates: Sequence[str | Callable[[str], str]] = ("a photo of a {}.",), *,
                  scale: float = 100.0) -> ZeroShotHead:
        """Prototypes from a CLIP model's text encoder (prompt-ensembled, unit rows; `model.encode_text`): the
        head then scores CLIP image embeddings (`model.encode_image`)."""
        from cvzoo.ssl.clip import zero_shot_classifier

        weight = zero_shot_classifier(model, tokenizer, classnames, templates)  # (D, K)
        return cls(weight.t(), metric="cosine", scale=scale, classnames=classnames)

    @classmethod
    def from_attributes(cls, attributes: Tensor, in_features: int, *, metric: str = "cosine", scale: float = 10.0,
                        classnames: Sequence[str] | None = None) -> ZeroShotHead:
        """Prototypes = class attribute vectors (K, A); a learnt linear projection maps (B, in_features)
        features to attribute space."""
        attributes = _check_prototypes(attributes, "attributes")
        check_positive_int("in_features", in_features)
        return cls(attributes.float(), projection=nn.Linear(in_features, attributes.shape[1]), metric=metric,
                   scale=scale, classnames=classnames)

    def forward(self, features: Tensor) -> Tensor:
        if not isinstance(features, Tensor) or features.ndim != 2:
            raise ValueError(f"features must be a (B, D) tensor, got "
                             f"{tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__}")
        z = self.projection(features).float()  # (B, A)
        prototypes = self.prototypes.float()
        if z.shape[-1] != prototypes.shape[-1]:
            raise ValueError(f"features project to width {z.shape[-1]} but the prototypes have width "
                             f"{prototypes.shape[-1]}")
        if self.metric == "dot":
            return z @ prototypes.t()
        return self.scale * F.normalize(z, dim=-1) @ F.normalize(prototypes, dim=-1).t()  # (B, K)

    def loss(self, features: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """Cross entropy over the current classes (the seen ones, in training)."""
        logits = self(features)
        return {"loss": F.cross_entropy(logits, labels.long()),
                "accuracy": (logits.argmax(-1) == labels).float().mean().detach()}
