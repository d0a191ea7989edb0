"""RetinaNet (Lin et al. 2017) and ATSS (Zhang et al. 2020): anchor-based dense detectors."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cvzoo.detection.assigners import ATSSAssigner, MaxIoUAssigner, gather_targets
from cvzoo.detection.coders import BoxCoder, centerness
from cvzoo.detection.detector import DenseDetector
from cvzoo.detection.losses import centerness_loss, giou_loss, l1_loss, label_focal_loss
from cvzoo.detection.postprocess import batched_postprocess
from cvzoo.detection.priors import AnchorGenerator, retinanet_anchor_sizes
from cvzoo.detection.structures import Detections, TargetBatch
from cvzoo.heads.dense import ATSSOutput, DenseOutput

BOX_LOSSES = ("l1", "giou")


def default_anchor_generator(strides: Sequence[int], num_anchors: int) -> AnchorGenerator:
    """RetinaNet's anchors (9 a location: 3 octave sizes from 4 x stride, ratios 0.5/1/2), or for one
    anchor a location a square of 8 x stride (ATSS)."""
    if num_anchors == 9:
        return AnchorGenerator(retinanet_anchor_sizes(tuple(4 * s for s in strides)), (0.5, 1.0, 2.0), strides)
    if num_anchors == 1:
        return AnchorGenerator(tuple((8 * s,) for s in strides), (1.0,), strides)
    raise ValueError(f"no default anchors for num_anchors={num_anchors}; pass anchor_generator")


class RetinaNet(DenseDetector):
    """RetinaNet: RetinaHead deltas w.r.t. anchors, MaxIoU assignment, focal + L1 (or GIoU) loss.

    Losses follow torchvision: each image's sums are divided by its foreground count (at least 1),
    then averaged over images; ignored anchors (IoU between the thresholds) add nothing.
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module | None, head: nn.Module,
                 anchor_generator: AnchorGenerator | None = None, assigner: MaxIoUAssigner | None = None,
                 box_coder: BoxCoder | None = None, box_loss: str = "l1", score_thresh: float = 0.05,
                 nms_thresh: float | None = 0.5, max_detections: int = 300, topk_candidates: int = 1000,
                 pad_divisor: int = 32) -> None:
        super().__init__(backbone, neck, head, pad_divisor, score_thresh, nms_thresh, max_detections,
                         topk_candidates)
        self.anchor_generator = anchor_generator or default_anchor_generator(self.strides, head.num_anchors)
        if self.anchor_generator.num_anchors != head.num_anchors:
            raise ValueError(f"anchor_generator gives {self.anchor_generator.num_anchors} anchors a location but "
                             f"the head predicts {head.num_anchors}")
        if self.anchor_generator.strides != self.strides:
            raise ValueError(f"anchor_generator strides {self.anchor_generator.strides} differ from the pyramid's "
                             f"{self.strides}")
        if box_loss not in BOX_LOSSES:
            raise ValueError(f"box_loss must be one of {BOX_LOSSES}, got {box_loss!r}")
        self.assigner = assigner or MaxIoUAssigner()
        self.box_coder = box_coder or BoxCoder()
        self.box_loss = box_loss

    @classmethod
    def output_names(cls) -> tuple[str, ...]:
        return DenseOutput._fields

    @classmethod
    def from_torchvision(cls, tv_model: nn.Module) -> RetinaNet:
        """torchvision `retinanet_resnet50_fpn` / `_v2` -> cvzoo RetinaNet with the same weights and settings."""
        from cvzoo.detection.torchvision_interop import retinanet_from_torchvision

        return retinanet_from_torchvision(tv_model)

    def priors(self, sizes: Sequence[tuple[int, int]], like: Tensor) -> Tensor:
        return self.anchor_generator(sizes, device=like.device, dtype=torch.float32)  # (R, 4)

    def num_per_level(self, sizes: Sequence[tuple[int, int]]) -> list[int]:
        return [h * w * self.head.num_anchors for h, w in sizes]

    def compute_loss(self, out: DenseOutput, sizes, targets: TargetBatch, image_sizes: Tensor) -> dict[str, Tensor]:
        anchors = self.priors(sizes, out.cls_logits)
        matched = self.assigner(anchors, targets)  # (B, R)
        gt_boxes, gt_labels = gather_targets(targets, matched)
        fg = (matched >= 0).float()  # (B, R)
        num_fg = fg.sum(dim=1).clamp(min=1)  # (B,)
        cls = label_focal_loss(out.cls_logits, gt_labels, weight=(matched != -2).float()).sum(dim=1)
        if self.box_loss == "l1":
            box = l1_loss(out.box_deltas, self.box_coder.encode(gt_boxes, anchors), fg)
        else:
            box = giou_loss(self.box_coder.decode(out.box_deltas.float(), anchors), gt_boxes, fg)
        losses = {"classification": (cls / num_fg).mean(), "box_regression": (box.sum(dim=1) / num_fg).mean()}
        losses["loss"] = losses["classification"] + losses["box_regression"]
        return losses

    def decode_dense(self, out: DenseOutput, sizes) -> tuple[Tensor, Tensor]:
        anchors = self.priors(sizes, out.cls_logits)
        return torch.sigmoid(out.cls_logits.float()), self.box_coder.decode(out.box_deltas.float(), anchors)

    def postprocess(self, out: DenseOutput, sizes, image_sizes, score_thresh, nms_thresh, max_detections,
                    topk_candidates) -> list[Detections]:
        anchors = self.priors(sizes, out.cls_logits)

        def decode(idx: Tensor) -> Tensor:  # (B, N) prior rows -> (B, N, 4) boxes
            deltas = torch.gather(out.box_deltas.float(), 1, idx[..., None].expand(-1, -1, 4))
            return self.box_coder.decode(deltas, anchors[idx])

        return batched_postprocess(out.cls_logits, decode, self.num_per_level(sizes), image_sizes, score_thresh,
                                   nms_thresh, topk_candidates, max_detections, to_probability=torch.sigmoid)


class ATSS(RetinaNet):
    """ATSS: one square anchor a location, adaptive assignment, focal + GIoU (weighted by centre-ness
    targets) + centre-ness BCE, with an ATSSHead; normalised over the whole batch as MMDetection does.
    Scores at inference are sqrt(sigmoid(class) * sigmoid(centre-ness)).
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module | None, head: nn.Module,
                 anchor_generator: AnchorGenerator | None = None, assigner: ATSSAssigner | None = None,
                 box_coder: BoxCoder | None = None, score_thresh: float = 0.05, nms_thresh: float | None = 0.6,
                 max_detections: int = 100, topk_candidates: int = 1000, pad_divisor: int = 32) -> None:
        super().__init__(backbone, neck, head, anchor_generator, MaxIoUAssigner(),
                         box_coder or BoxCoder((10.0, 10.0, 5.0, 5.0)), "giou", score_thresh, nms_thresh,
                         max_detections, topk_candidates, pad_divisor)
        self.assigner = assigner or ATSSAssigner()

    @classmethod
    def output_names(cls) -> tuple[str, ...]:
        return ATSSOutput._fields

    def compute_loss(self, out: ATSSOutput, sizes, targets: TargetBatch, image_sizes: Tensor) -> dict[str, Tensor]:
        anchors = self.priors(sizes, out.cls_logits)
        matched = self.assigner(anchors, targets, self.num_per_level(sizes))  # (B, R)
        gt_boxes, gt_labels = gather_targets(targets, matched)
        fg = (matched >= 0).float()
        num_fg = fg.sum().clamp(min=1)
        ctr = (anchors[:, :2] + anchors[:, 2:]) / 2  # (R, 2)
        ltrb = torch.cat([ctr - gt_boxes[..., :2], gt_boxes[..., 2:] - ctr], dim=-1)  # (B, R, 4)
        ctr_target = torch.where(fg > 0, centerness(torch.where(fg[..., None] > 0, ltrb, torch.ones_like(ltrb))),
                                 torch.zeros_like(fg))
        pred_boxes = self.box_coder.decode(out.box_deltas.float(), anchors)
        losses = {
            "classification": label_focal_loss(out.cls_logits, gt_labels).sum() / num_fg,
            "box_regression": giou_loss(pred_boxes, gt_boxes, ctr_target).sum() / ctr_target.sum().clamp(min=1e-6),
            "centerness": centerness_loss(out.centerness[..., 0], ctr_target, fg).sum() / num_fg,
        }
        losses["loss"] = losses["classification"] + 2.0 * losses["box_regression"] + losses["centerness"]
        return losses

    def decode_dense(self, out: ATSSOutput, sizes) -> tuple[Tensor, Tensor]:
        anchors = self.priors(sizes, out.cls_logits)
        scores = torch.sqrt(torch.sigmoid(out.cls_logits.float()) * torch.sigmoid(out.centerness.float()))
        return scores, self.box_coder.decode(out.box_deltas.float(), anchors)

    def postprocess(self, out: ATSSOutput, sizes, image_sizes, score_thresh, nms_thresh, max_detections,
                    topk_candidates) -> list[Detections]:
        anchors = self.priors(sizes, out.cls_logits)

        def decode(idx: Tensor) -> Tensor:
            deltas = torch.gather(out.box_deltas.float(), 1, idx[..., None].expand(-1, -1, 4))
            return self.box_coder.decode(deltas, anchors[idx])

        # scores sqrt(sigmoid(class) * sigmoid(centre-ness)), computed for the selected pairs only
        return batched_postprocess(out.cls_logits, decode, self.num_per_level(sizes), image_sizes, score_thresh,
                                   nms_thresh, topk_candidates, max_detections, prior_logits=out.centerness[..., 0])
