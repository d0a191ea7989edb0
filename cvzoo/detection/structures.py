"""Targets as one padded batch, and per-image detections.

Boxes are absolute xyxy in input-image pixels. Padding rows of a TargetBatch have label -1 and
zero boxes; they never match a prior.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import NamedTuple

import torch
from torch import Tensor

NO_EXTRAS: Mapping[str, Tensor] = MappingProxyType({})


class Detections(NamedTuple):
    boxes: Tensor  # (N, 4) xyxy in input-image pixels
    scores: Tensor  # (N,)
    labels: Tensor  # (N,) int64
    # what per-object heads add, one (N, ...) tensor each: "masks" (N, H, W) probabilities pasted into the
    # image, "keypoints" (N, K, 3) x, y, visibility in image pixels, "keypoint_scores" (N, K), 3D boxes, attributes
    extras: Mapping[str, Tensor] = NO_EXTRAS

    def to_dict(self) -> dict[str, Tensor]:
        """torchvision's detection format: {"boxes", "scores", "labels", **extras}."""
        return {"boxes": self.boxes, "scores": self.scores, "labels": self.labels, **self.extras}


class TargetBatch(NamedTuple):
    boxes: Tensor  # (B, M, 4) xyxy, zeros on padding rows
    labels: Tensor  # (B, M) int64, -1 on padding rows
    masks: Tensor | None = None  # (B, M, H, W) float instance masks, zeros on padding rows
    keypoints: Tensor | None = None  # (B, M, K, 3) x, y, visibility (> 0 visible) in pixels, zeros on padding
    attributes: Mapping[str, Tensor] = NO_EXTRAS  # name -> (B, M, ...) per-object values, zeros on padding

    @property
    def valid(self) -> Tensor:
        """(B, M) bool: real boxes, not padding."""
        return self.labels >= 0

    @classmethod
    def from_list(
        cls,
        targets: Sequence[Mapping[str, Tensor]],
        num_images: int,
        num_classes: int,
        device: torch.device | str | None = None,
        masks: bool = False,
        num_keypoints: int | None = None,
        attributes: Mapping[str, Sequence[int]] | None = None,
    ) -> TargetBatch:
        """torchvision-style targets (list of {"boxes": (N_i, 4) xyxy, "labels": (N_i,)}) -> padded batch.

        With `masks`, each dict also needs "masks" (N_i, H_i, W_i) (padded to the largest H, W); with
        `num_keypoints` K, "keypoints" (N_i, K, 3) (x, y, visibility); `attributes` maps each extra
        per-object field to the shape of one object's value (`()` for a scalar, e.g. {"price": ()}).
        Validates at the boundary: ValueErrors name the image index and the field (for boxes, the box).
        """
        if isinstance(targets, Mapping) or not isinstance(targets, Sequence):
            raise ValueError(f"targets must be a list of dicts with 'boxes' and 'labels', got {type(targets).__name__}")
        if len(targets) != num_images:
            raise ValueError(f"len(targets) is {len(targets)} but there are {num_images} images; expected one "
                             "dict per image")
        boxes_list, labels_list = [], []
        for i, t in enumerate(targets):
            if not isinstance(t, Mapping) or "boxes" not in t or "labels" not in t:
                raise ValueError(f"targets[{i}] must be a dict with 'boxes' and 'labels', got {t!r:.80}")
            boxes, labels = t["boxes"], t["labels"]
            if not isinstance(boxes, Tensor) or boxes.ndim != 2 or boxes.shape[-1] != 4:
                shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
                raise ValueError(f"targets[{i}]['boxes'] must be a (N, 4) xyxy tensor, got {shape}")
            if not isinstance(labels, Tensor) or labels.shape != boxes.shape[:1]:
                shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
                raise ValueError(f"targets[{i}]['labels'] must have shape ({boxes.shape[0]},) to match its boxes, "
                                 f"got {shape}")
            if labels.is_floating_point() or labels.dtype == torch.bool:
                raise ValueError(f"targets[{i}]['labels'] must be integer class indices, got dtype {labels.dtype}")
            if not boxes.is_floating_point():
                boxes = boxes.float()
            bad = ~(torch.isfinite(boxes).all(-1) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))
            if bool(bad.any()):
                j = int(bad.nonzero()[0, 0])
                raise ValueError(f"targets[{i}]['boxes'][{j}] = {boxes[j].tolist()} is degenerate or non-finite; "
                                 "expected finite xyxy with x2 > x1 and y2 > y1")
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
                j = int(((labels < 0) | (labels >= num_classes)).nonzero()[0, 0])
                raise ValueError(f"targets[{i}]['labels'][{j}] = {int(labels[j])} is out of range; expected "
                                 f"0 <= label < num_classes={num_classes}")
            _check_fields(t, i, boxes.shape[0], masks, num_keypoints, attributes or {})
            boxes_list.append(boxes)
            labels_list.append(labels)
        batch = cls.from_padded_lists(boxes_list, labels_list, device)
        m, dev = batch.labels.shape[1], batch.labels.device
        if masks:
            h = max(t["masks"].shape[-2] for t in targets)
            w = max(t["masks"].shape[-1] for t in targets)
            padded = torch.zeros(num_images, m, h, w, device=dev)
            for i, t in enumerate(targets):  # one copy per image: masks differ in size
                mk = t["masks"]
                padded[i, :mk.shape[0], :mk.shape[1], :mk.shape[2]] = mk.to(dev, torch.float32)
            batch = batch._replace(masks=padded)
        if num_keypoints is not None:
            batch = batch._replace(keypoints=_pad_field([t["keypoints"] for t in targets], m, dev))
        if attributes:
            batch = batch._replace(attributes=MappingProxyType(
                {name: _pad_field([t[name] for t in targets], m, dev) for name in attributes}))
        return batch

    @classmethod
    def from_padded_lists(cls, boxes: Sequence[Tensor], labels: Sequence[Tensor],
                          device: torch.device | str | None = None) -> TargetBatch:
        """Pads per-image (N_i, 4) boxes and (N_i,) labels into (B, M, 4) and (B, M), M = max(1, max N_i).

        Built with one pad_sequence call per field, not a loop of copies.
        """
        device = device if device is not None else (boxes[0].device if boxes else "cpu")
        m = max([1] + [b.shape[0] for b in boxes])
        # one extra dummy row makes pad_sequence pad every image to m (it pads to the longest sequence)
        dummy_b = torch.zeros(m, 4, device=device)
        dummy_l = torch.zeros(m, dtype=torch.int64, device=device)
        b = torch.nn.utils.rnn.pad_sequence([*(x.to(device, torch.float32) for x in boxes), dummy_b],
                                            batch_first=True)[:-1]
        lab = torch.nn.utils.rnn.pad_sequence([*(x.to(device, torch.int64) for x in labels), dummy_l],
                                              batch_first=True, padding_value=-1)[:-1]
        return cls(b, lab)


def _pad_field(values: Sequence[Tensor], m: int, device) -> Tensor:
    """[(N_i, ...)] -> (B, m, ...) float, zeros on padding rows."""
    out = torch.zeros(len(values), m, *values[0].shape[1:], device=device)
    for i, v in enumerate(values):
        out[i, :v.shape[0]] = v.to(device, torch.float32)
    return out


def _check_fields(t: Mapping[str, Tensor], i: int, n: int, masks: bool, num_keypoints: int | None,
                  attributes: Mapping[str, Sequence[int]]) -> None:
    """ValueErrors naming image i and the field when a per-object field disagrees with its n boxes."""
    def shape_of(name: str) -> tuple | str:
        return tuple(t[name].shape) if isinstance(t[name], Tensor) else type(t[name]).__name__

    if masks:
        if "masks" not in t:
            raise ValueError(f"targets[{i}] has no 'masks'; this model needs (N, H, W) instance masks per image")
        if not isinstance(t["masks"], Tensor) or t["masks"].ndim != 3 or t["masks"].shape[0] != n:
            raise ValueError(f"targets[{i}]['masks'] must be ({n}, H, W), one mask per box, got {shape_of('masks')}")
    if num_keypoints is not None:
        if "keypoints" not in t:
            raise ValueError(f"targets[{i}] has no 'keypoints'; this model needs (N, {num_keypoints}, 3) keypoints")
        kp = t["keypoints"]
        if not isinstance(kp, Tensor) or kp.shape != (n, num_keypoints, 3):
            raise ValueError(f"targets[{i}]['keypoints'] must be ({n}, {num_keypoints}, 3) (x, y, visibility; "
                             f"K={num_keypoints} as the head predicts), got {shape_of('keypoints')}")
    for name, shape in attributes.items():
        if name not in t:
            raise ValueError(f"targets[{i}] has no {name!r}; this model needs a ({n}, *{tuple(shape)}) tensor")
        if not isinstance(t[name], Tensor) or tuple(t[name].shape) != (n, *shape):
            raise ValueError(f"targets[{i}][{name!r}] must be {(n, *shape)}, one value per box, got "
                             f"{shape_of(name)}")
        if not bool(torch.isfinite(t[name].float()).all()):
            raise ValueError(f"targets[{i}][{name!r}] holds non-finite values")
