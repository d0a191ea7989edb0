"""CenterNet (Zhou et al. 2019, "Objects as Points"): boxes as heatmap peaks plus size and offset."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvzoo.detection.detector import DenseDetector
from cvzoo.detection.heatmaps import CenterNetEncoder
from cvzoo.detection.losses import gaussian_focal_loss, l1_loss
from cvzoo.detection.postprocess import batched_postprocess
from cvzoo.detection.structures import Detections, TargetBatch
from cvzoo.heads.dense import CenterNetOutput


class CenterNet(DenseDetector):
    """CenterNet on one pyramid level (the head's `in_index`): Gaussian focal loss on class heatmaps,
    L1 on size (weight `size_weight`) and offset at centre cells, each divided by the batch's box count.

    Inference keeps 3x3 heatmap peaks, takes the top `topk_candidates` over classes and cells per
    image and decodes (cell + offset +- size / 2) * stride; NMS is off by default (`nms_thresh=None`).
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module | None, head: nn.Module, size_weight: float = 0.1,
                 min_overlap: float = 0.7, score_thresh: float = 0.1, nms_thresh: float | None = None,
                 max_detections: int = 100, topk_candidates: int = 100, pad_divisor: int = 32) -> None:
        super().__init__(backbone, neck, head, pad_divisor, score_thresh, nms_thresh, max_detections,
                         topk_candidates)
        self.stride = self.strides[head.in_index]
        self.size_weight = size_weight
        self.encoder = CenterNetEncoder(self.num_classes, self.stride, min_overlap)

    @classmethod
    def output_names(cls) -> tuple[str, ...]:
        return CenterNetOutput._fields

    def _level_size(self, sizes) -> tuple[int, int]:
        return sizes[self.head.in_index]

    def compute_loss(self, out: CenterNetOutput, sizes, targets: TargetBatch, image_sizes: Tensor
                     ) -> dict[str, Tensor]:
        t = self.encoder(targets, self._level_size(sizes))
        num = targets.valid.sum().clamp(min=1).float()
        losses = {
            "heatmap": gaussian_focal_loss(out.heatmap_logits, t.heatmap).sum() / num,
            "size": l1_loss(out.sizes, t.sizes, t.mask).sum() / num,
            "offset": l1_loss(out.offsets, t.offsets, t.mask).sum() / num,
        }
        losses["loss"] = losses["heatmap"] + self.size_weight * losses["size"] + losses["offset"]
        return losses

    def _cells(self, sizes, like: Tensor) -> Tensor:
        """(HW, 2) x, y of each heatmap cell, in heatmap units."""
        h, w = self._level_size(sizes)
        cy, cx = torch.meshgrid(torch.arange(h, device=like.device, dtype=torch.float32),
                                torch.arange(w, device=like.device, dtype=torch.float32), indexing="ij")
        return torch.stack([cx, cy], dim=-1).reshape(-1, 2)

    def decode_dense(self, out: CenterNetOutput, sizes) -> tuple[Tensor, Tensor]:
        """Heatmap probabilities (no peak selection) and the box each cell predicts."""
        ctr = self._cells(sizes, out.heatmap_logits) + out.offsets.float()
        half = out.sizes.float().clamp(min=0) / 2
        return torch.sigmoid(out.heatmap_logits.float()), torch.cat([ctr - half, ctr + half], dim=-1) * self.stride

    def postprocess(self, out: CenterNetOutput, sizes, image_sizes, score_thresh, nms_thresh, max_detections,
                    topk_candidates) -> list[Detections]:
        h, w = self._level_size(sizes)
        b, r, k = out.heatmap_logits.shape
        heat = torch.sigmoid(out.heatmap_logits.float()).transpose(1, 2).reshape(b, k, h, w)
        peaks = heat * (F.max_pool2d(heat, 3, 1, 1) == heat)  # keep local maxima only
        scores = peaks.reshape(b, k, r).transpose(1, 2)  # (B, HW, K)
        cells = self._cells(sizes, heat)

        def decode(idx: Tensor) -> Tensor:
            ctr = cells[idx] + torch.gather(out.offsets.float(), 1, idx[..., None].expand(-1, -1, 2))
            half = torch.gather(out.sizes.float(), 1, idx[..., None].expand(-1, -1, 2)).clamp(min=0) / 2
            return torch.cat([ctr - half, ctr + half], dim=-1) * self.stride

        return batched_postprocess(scores, decode, [r], image_sizes, score_thresh, nms_thresh, topk_candidates,
                                   max_detections)
