"""FCOS (Tian et al. 2019): anchor-free dense detection on points."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvzoo.detection.assigners import FCOSAssigner, gather_targets
from cvzoo.detection.boxes import ltrb_giou
from cvzoo.detection.coders import DistanceCoder, centerness
from cvzoo.detection.detector import DenseDetector
from cvzoo.detection.losses import label_focal_loss
from cvzoo.detection.postprocess import batched_postprocess
from cvzoo.detection.priors import PointGenerator
from cvzoo.detection.structures import Detections, TargetBatch
from cvzoo.heads.dense import FCOSOutput


class FCOS(DenseDetector):
    """FCOS: FCOSHead stride-normalised ltrb distances from points, FCOSAssigner (centre sampling, size
    ranges, smallest box), focal + GIoU + centre-ness BCE, each divided by the batch's foreground count.
    Scores at inference are sqrt(sigmoid(class) * sigmoid(centre-ness)), as torchvision.

    `point_offset` places points at (x + offset) * stride: 0.5 (cell centres, default) or 0 (torchvision).
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module | None, head: nn.Module,
                 assigner: FCOSAssigner | None = None, point_offset: float = 0.5, score_thresh: float = 0.2,
                 nms_thresh: float | None = 0.6, max_detections: int = 100, topk_candidates: int = 1000,
                 pad_divisor: int = 32) -> None:
        super().__init__(backbone, neck, head, pad_divisor, score_thresh, nms_thresh, max_detections,
                         topk_candidates)
        self.point_generator = PointGenerator(self.strides, point_offset)
        self.assigner = assigner or FCOSAssigner()
        self.box_coder = DistanceCoder(normalize=True)

    @classmethod
    def output_names(cls) -> tuple[str, ...]:
        return FCOSOutput._fields

    @classmethod
    def from_torchvision(cls, tv_model: nn.Module) -> FCOS:
        """torchvision `fcos_resnet50_fpn` -> cvzoo FCOS with the same weights and settings."""
        from cvzoo.detection.torchvision_interop import fcos_from_torchvision

        return fcos_from_torchvision(tv_model)

    def priors(self, sizes: Sequence[tuple[int, int]], like: Tensor) -> tuple[Tensor, Tensor]:
        return self.point_generator(sizes, device=like.device, dtype=torch.float32)  # (R, 2), (R,)

    def compute_loss(self, out: FCOSOutput, sizes, targets: TargetBatch, image_sizes: Tensor) -> dict[str, Tensor]:
        points, strides = self.priors(sizes, out.cls_logits)
        num_per_level = [h * w for h, w in sizes]
        matched = self.assigner(points, strides, targets, num_per_level, self.strides)  # (B, R)
        gt_boxes, gt_labels = gather_targets(targets, matched)
        is_fg = matched >= 0  # (B, R)
        fg = is_fg.float()
        num_fg = fg.sum().clamp(min=1)
        # target distances in strides, positive on foreground; unit distances on background keep the masked
        # centre-ness and GIoU terms finite. GIoU is computed on the distances themselves (no decoding):
        # both boxes are seen from the same point at the same scale (see ltrb_giou)
        ltrb = self.box_coder.encode(gt_boxes, points, strides)  # (B, R, 4)
        ltrb = torch.where(is_fg[..., None], ltrb, 1.0)
        ctr_target = centerness(ltrb)  # (B, R), 1 on background
        # every background term is finite (unit target distances, ReLU'd predicted ones), so a weighted sum
        # masks it exactly: no where() a term, and BCE's own weight argument (a third of the operations)
        giou = ltrb_giou(out.box_distances.float(), ltrb)  # (B, R)
        ctr_bce = F.binary_cross_entropy_with_logits(out.centerness[..., 0].float(), ctr_target, weight=fg,
                                                     reduction="sum")
        losses = {
            "classification": label_focal_loss(out.cls_logits, gt_labels).sum() / num_fg,
            "box_regression": ((1 - giou) * fg).sum() / num_fg,
            "centerness": ctr_bce / num_fg,
        }
        losses["loss"] = losses["classification"] + losses["box_regression"] + losses["centerness"]
        return losses

    def decode_dense(self, out: FCOSOutput, sizes) -> tuple[Tensor, Tensor]:
        points, strides = self.priors(sizes, out.cls_logits)
        scores = torch.sqrt(torch.sigmoid(out.cls_logits.float()) * torch.sigmoid(out.centerness.float()))
        return scores, self.box_coder.decode(out.box_distances.float(), points, strides)

    def postprocess(self, out: FCOSOutput, sizes, image_sizes, score_thresh, nms_thresh, max_detections,
                    topk_candidates) -> list[Detections]:
        points, strides = self.priors(sizes, out.cls_logits)

        def decode(idx: Tensor) -> Tensor:
            dist = torch.gather(out.box_distances.float(), 1, idx[..., None].expand(-1, -1, 4))
            return self.box_coder.decode(dist, points[idx], strides[idx])

        # scores sqrt(sigmoid(class) * sigmoid(centre-ness)), computed for the selected pairs only
        return batched_postprocess(out.cls_logits, decode, [h * w for h, w in sizes], image_sizes, score_thresh,
                                   nms_thresh, topk_candidates, max_detections, prior_logits=out.centerness[..., 0])
