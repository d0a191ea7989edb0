"""COCO-style evaluation of a detector through torchmetrics' MeanAveragePrecision."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from cvzoo._optional import require


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[tuple[Sequence[Tensor] | Tensor, Sequence[Mapping[str, Tensor]]]],
             device: torch.device | str | None = None, class_names: Sequence[str] | None = None,
             **predict_kwargs) -> dict[str, float | dict[str, float]]:
    """Runs `model.predict` over `loader` batches of (images, torchvision-style targets) and returns
    {"map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100", "per_class": {name: AP}}.

    APs are COCO's (IoU 0.5:0.95), -1 where a class has no ground truth. Needs `pip install 'cvzoo[metrics]'`.
    """
    metrics = require("torchmetrics.detection", "metrics", "detection evaluation")
    metric = metrics.MeanAveragePrecision(box_format="xyxy", iou_type="bbox", class_metrics=True)
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    try:
        for images, targets in loader:
            images = images.to(device) if isinstance(images, Tensor) else [im.to(device) for im in images]
            dets = model.predict(images, **predict_kwargs)
            metric.update(
                [{"boxes": d.boxes.cpu(), "scores": d.scores.cpu(), "labels": d.labels.cpu()} for d in dets],
                [{"boxes": t["boxes"].cpu().float(), "labels": t["labels"].cpu().long()} for t in targets],
            )
        result = metric.compute()
    finally:
        model.train(was_training)
    out: dict[str, float | dict[str, float]] = {
        k: float(result[k]) for k in ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100")
    }
    classes = result["classes"].reshape(-1).tolist()
    aps = result["map_per_class"].reshape(-1).tolist()
    out["per_class"] = {(class_names[c] if class_names else str(c)): ap for c, ap in zip(classes, aps)}
    return out
