"""Multi-task model: one backbone, several named heads, a weighted sum of per-task losses."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvzoo.classification.classifier import ClassificationPrediction
from cvzoo.classification.targets import check_class_targets, check_value_targets
from cvzoo.heads import ClassificationHead, KeypointRegressionHead, MultiTaskHead, RegressionHead
from cvzoo.types import cast_like_parameters

LossFn = Callable[[Tensor, Tensor], Tensor]


def _default_loss(head: nn.Module) -> LossFn:
    if isinstance(head, ClassificationHead):
        return F.cross_entropy
    if isinstance(head, KeypointRegressionHead):
        return F.l1_loss  # on normalised coordinates
    if isinstance(head, RegressionHead):
        return F.smooth_l1_loss
    raise ValueError(f"no default loss for head {type(head).__name__}; pass one in loss_fns")


class MultiTaskModel(nn.Module):
    """(B, C, H, W) -> {task: head output} for the named heads of a `MultiTaskHead`.

    `loss(images, targets)` takes {task: target}: class indices (B,) for a ClassificationHead,
    values (B, num_outputs) for a RegressionHead, normalised points (B, K, 2) in [0, 1] for a
    KeypointRegressionHead. It returns {"loss": sum_t w_t * loss_t, task: loss_t}. Default losses
    are cross entropy, smooth L1 and L1; `loss_fns` and `loss_weights` override them per task.
    """

    def __init__(self, backbone: nn.Module, head: MultiTaskHead, neck: nn.Module | None = None,
                 loss_weights: Mapping[str, float] | None = None,
                 loss_fns: Mapping[str, LossFn] | None = None) -> None:
        super().__init__()
        if not isinstance(head, MultiTaskHead):
            raise ValueError(f"head must be a MultiTaskHead, got {type(head).__name__}")
        tasks = list(head.heads)
        loss_weights, loss_fns = dict(loss_weights or {}), dict(loss_fns or {})
        for arg, given in (("loss_weights", loss_weights), ("loss_fns", loss_fns)):
            unknown = sorted(set(given) - set(tasks))
            if unknown:
                raise ValueError(f"{arg} names tasks {unknown} that the head lacks; tasks are {tasks}")
        bad = {k: w for k, w in loss_weights.items() if not w >= 0}
        if bad:
            raise ValueError(f"loss_weights must be non-negative, got {bad}")
        self.backbone = backbone
        self.neck = neck
        self.head = head
        self.loss_weights = {t: float(loss_weights.get(t, 1.0)) for t in tasks}
        self.loss_fns = {t: loss_fns.get(t) or _default_loss(head.heads[t]) for t in tasks}
        self.signature = backbone.signature.replace(outputs=tuple(tasks))

    @property
    def tasks(self) -> list[str]:
        return list(self.head.heads)

    def forward(self, images: Tensor) -> dict[str, tuple]:
        feats = self.backbone(images)
        if self.neck is not None:
            feats = self.neck(feats)
        return self.head(feats)

    def _check_targets(self, targets: object, batch: int) -> dict[str, Tensor]:
        if not isinstance(targets, Mapping):
            raise ValueError(f"targets must be a dict mapping each task {self.tasks} to a tensor, "
                             f"got {type(targets).__name__}")
        missing, unknown = sorted(set(self.tasks) - set(targets)), sorted(set(targets) - set(self.tasks))
        if missing or unknown:
            raise ValueError(f"targets must have exactly the tasks {self.tasks}; missing {missing}, unknown {unknown}")
        out = {}
        for task, head in self.head.heads.items():
            name = f"targets[{task!r}]"
            if isinstance(head, ClassificationHead):
                out[task] = check_class_targets(targets[task], batch, head.num_classes, name)
            elif isinstance(head, KeypointRegressionHead):
                out[task] = check_value_targets(targets[task], (batch, head.num_keypoints, 2), name)
            elif isinstance(head, RegressionHead):
                out[task] = check_value_targets(targets[task], (batch, head.num_outputs), name)
            else:
                out[task] = targets[task]
        return out

    def loss(self, images: Tensor, targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
        images = cast_like_parameters(self.signature.validate(images), self)
        targets = self._check_targets(targets, images.shape[0])
        outputs = self(images)
        losses: dict[str, Tensor] = {}
        for task in self.tasks:
            pred = outputs[task][0].float()  # each head's NamedTuple has one field; float32 under autocast
            losses[task] = self.loss_fns[task](pred, targets[task])
        losses["loss"] = sum(self.loss_weights[t] * losses[t] for t in self.tasks)
        return losses

    @torch.no_grad()
    def predict(self, images: Tensor) -> dict[str, object]:
        """{task: ClassificationPrediction for classification heads, else the raw tensor}."""
        images = cast_like_parameters(self.signature.validate(images), self)
        outputs = self(images)
        preds: dict[str, object] = {}
        for task, head in self.head.heads.items():
            raw = outputs[task][0]
            is_class = isinstance(head, ClassificationHead)
            preds[task] = ClassificationPrediction.from_logits(raw) if is_class else raw.float()
        return preds
