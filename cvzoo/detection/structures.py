"""Targets as one padded batch, and per-image detections.

Boxes are absolute xyxy in input-image pixels. Padding rows of a TargetBatch have label -1 and
zero boxes; they never match a prior.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor


class Detections(NamedTuple):
    boxes: Tensor  # (N, 4) xyxy in input-image pixels
    scores: Tensor  # (N,)
    labels: Tensor  # (N,) int64


class TargetBatch(NamedTuple):
    boxes: Tensor  # (B, M, 4) xyxy, zeros on padding rows
    labels: Tensor  # (B, M) int64, -1 on padding rows

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
    ) -> TargetBatch:
        """torchvision-style targets (list of {"boxes": (N_i, 4) xyxy, "labels": (N_i,)}) -> padded batch.

        Validates at the boundary: ValueErrors name the image index and, for boxes, the offending box.
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
            boxes_list.append(boxes)
            labels_list.append(labels)
        return cls.from_padded_lists(boxes_list, labels_list, device)

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
