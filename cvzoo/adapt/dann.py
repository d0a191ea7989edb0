"""DANN (Ganin et al. 2016), also the "learning not to learn" recipe (Kim et al. 2019): a feature extractor, a
label head, and an adversary that predicts a nuisance (the domain, or a spurious attribute such as colour)
from the features through a gradient-reversal layer, so the features learn to hide it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvzoo.adapt._checks import check_positive_int, pooled_features
from cvzoo.adapt.gradient_reversal import GradientReversal
from cvzoo.backbones.base import last_map_channels
from cvzoo.classification.classifier import ClassificationPrediction
from cvzoo.types import cast_like_parameters


class DANNOutput(NamedTuple):
    logits: Tensor  # (B, num_classes)
    adversary_logits: Tensor  # (B, num_domains)


def _mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


class DANN(nn.Module):
    """(B, C, H, W) normalised images -> `DANNOutput(logits (B, K), adversary_logits (B, D))`.

    `loss(images, targets)` with `targets = {"label": (B,), adversary_target: (B,)}` returns
    {"loss": classification + adversary_weight * adversary, "classification", "adversary",
    "adversary_accuracy"}. Labels of -1 are ignored by the label loss (unlabelled target-domain images in
    domain adaptation). The adversary always learns to predict the nuisance; the features receive its
    gradient times `-reversal` (scheduled from 0 to `reversal` over `schedule_steps` training calls when set).
    `reversal=0` is the plain model with a bias probe trained alongside on detached features.

    `adversary_sees_label=True` gives the adversary the label too (one-hot, zeros for unlabelled images; Zhang
    et al. 2018's equality-of-odds adversary): when the nuisance is correlated with the label in training (a
    spurious cue), an adversary reading the features alone would also punish the label information the model
    needs; given the label, it can only profit from -- and so only removes -- the nuisance information beyond it.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, num_domains: int, *, hidden_dim: int = 128,
                 reversal: float = 1.0, schedule_steps: int | None = None, gamma: float = 10.0,
                 adversary_weight: float = 1.0, adversary_target: str = "domain", adversary_sees_label: bool = False
                 ) -> None:
        super().__init__()
        dim = last_map_channels(backbone, "DANN")
        check_positive_int("num_classes", num_classes)
        check_positive_int("hidden_dim", hidden_dim)
        if isinstance(num_domains, bool) or not isinstance(num_domains, int) or num_domains < 2:
            raise ValueError(f"num_domains must be an integer >= 2 (the adversary's classes), got {num_domains!r}")
        if isinstance(adversary_weight, bool) or not isinstance(adversary_weight, (int, float)) or adversary_weight < 0:
            raise ValueError(f"adversary_weight must be a number >= 0, got {adversary_weight!r}")
        if not isinstance(adversary_target, str) or adversary_target == "label":
            raise ValueError(f"adversary_target must be the name of a target field other than 'label', got "
                             f"{adversary_target!r}")
        self.backbone = backbone
        self.classifier = nn.Linear(dim, num_classes)
        self.reversal = GradientReversal(reversal, schedule_steps=schedule_steps, gamma=gamma)
        self.adversary_sees_label = bool(adversary_sees_label)
        self.adversary = _mlp(dim + (num_classes if adversary_sees_label else 0), hidden_dim, num_domains)
        self.num_classes = num_classes
        self.num_domains = num_domains
        self.adversary_weight = float(adversary_weight)
        self.adversary_target = adversary_target
        self.signature = backbone.signature.replace(outputs=("logits", "adversary_logits"))

    def features(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, D) pooled features, the representation the adversary probes."""
        images = cast_like_parameters(self.signature.validate(images), self)
        return pooled_features(self.backbone, images)

    def forward(self, images: Tensor, labels: Tensor | None = None) -> DANNOutput:
        """`labels` (B,) feed a label-aware adversary (the true labels in `loss`; the predicted ones when None)."""
        feats = self.features(images)
        logits = self.classifier(feats)
        adversary_input = self.reversal(feats)
        if self.adversary_sees_label:
            label = logits.argmax(-1) if labels is None else labels
            one_hot = F.one_hot(label.clamp(min=0), self.num_classes).to(feats.dtype) * (label >= 0)[:, None]
            adversary_input = torch.cat([adversary_input, one_hot], dim=1)
        return DANNOutput(logits, self.adversary(adversary_input))

    def _check_targets(self, targets: object, batch: int) -> tuple[Tensor, Tensor]:
        if not isinstance(targets, Mapping) or "label" not in targets or self.adversary_target not in targets:
            raise ValueError(f"targets must be a dict with 'label' and {self.adversary_target!r} tensors of shape "
                             f"({batch},), got {type(targets).__name__}"
                             + (f" with keys {sorted(targets)}" if isinstance(targets, Mapping) else ""))
        out = []
        for key, n in (("label", self.num_classes), (self.adversary_target, self.num_domains)):
            t = targets[key]
            if not isinstance(t, Tensor) or t.shape != (batch,) or t.is_floating_point():
                raise ValueError(f"targets[{key!r}] must be an integer tensor of shape ({batch},), got "
                                 f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
            low = -1 if key == "label" else 0
            if not torch.compiler.is_compiling() and bool(((t < low) | (t >= n)).any()):
                raise ValueError(f"targets[{key!r}] holds values outside [{low}, {n - 1}]: {t.unique().tolist()}")
            out.append(t.long())
        return out[0], out[1]

    def loss(self, images: Tensor, targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
        labels, nuisance = self._check_targets(targets, images.shape[0] if isinstance(images, Tensor) else -1)
        out = self(images, labels)
        # label loss over labelled images only (label -1: unlabelled), a mean that is 0 when none is labelled
        per_image = F.cross_entropy(out.logits.float(), labels.clamp(min=0), reduction="none")
        labelled = (labels >= 0).float()
        classification = (per_image * labelled).sum() / labelled.sum().clamp(min=1)
        adversary = F.cross_entropy(out.adversary_logits.float(), nuisance)
        accuracy = (out.adversary_logits.argmax(-1) == nuisance).float().mean()
        return {"loss": classification + self.adversary_weight * adversary, "classification": classification,
                "adversary": adversary.detach(), "adversary_accuracy": accuracy.detach()}

    def predict(self, images: Tensor) -> ClassificationPrediction:
        return ClassificationPrediction.from_logits(self(images).logits)
