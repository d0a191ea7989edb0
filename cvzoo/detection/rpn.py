"""Region proposal network (Ren et al. 2015) for the whole batch at once.

Anchors, box coder and assigner are the dense detectors' own; proposals come back padded to (B, P, 4)
xyxy input pixels with a (B, P) validity mask, best first per image; P is the most proposals an image
kept after NMS (at most the post-NMS count).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvzoo.detection.assigners import MaxIoUAssigner, gather_targets
from cvzoo.detection.boxes import clip_boxes
from cvzoo.detection.coders import BoxCoder
from cvzoo.detection.losses import smooth_l1_loss
from cvzoo.detection.postprocess import nms_detections
from cvzoo.detection.priors import AnchorGenerator
from cvzoo.detection.roi import sample_rois
from cvzoo.detection.structures import TargetBatch
from cvzoo.heads.roi import RPNHead, RPNOutput


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def rpn_anchor_generator(strides: Sequence[int], sizes: Sequence[int] | None = None,
                         aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)) -> AnchorGenerator:
    """Faster R-CNN FPN anchors: one size a level (32, 64, ... for strides 4, 8, ...: 8 x stride), three
    aspect ratios, as torchvision's `fasterrcnn_resnet50_fpn`."""
    sizes = tuple(8 * s for s in strides) if sizes is None else tuple(sizes)
    return AnchorGenerator(tuple((s,) for s in sizes), aspect_ratios, strides)


def pad_rows(rows: Sequence[Tensor], length: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """[(N_i, ...)] with N_i <= length -> padded (B, length, ...) zeros after each image's rows, and the
    (B, length) bool mask of real rows."""
    out = like.new_zeros(len(rows), length, *rows[0].shape[1:])
    counts = torch.tensor([r.shape[0] for r in rows], device=like.device)
    valid = torch.arange(length, device=like.device)[None] < counts[:, None]  # (B, length)
    out[valid] = torch.cat(list(rows)).to(out.dtype)
    return out, valid


class RegionProposalNetwork(nn.Module):
    """RPN head + anchors -> proposals, and the RPN's losses in training.

    Proposal selection follows torchvision's RegionProposalNetwork: per image and level the
    `pre_nms_top_n` best anchors by objectness, decoded, clipped to the image, boxes smaller than
    `min_size` and scores under `score_thresh` dropped, NMS (`nms_thresh`) within each level, then the
    `post_nms_top_n` best of the image. Here top-k, decoding and clipping run on the whole batch at once
    and NMS is one batched call over (image, level) groups. Train and eval counts differ (torchvision:
    2000/2000 in training, 1000/1000 in evaluation); `self.training` picks them.

    Losses (torchvision's): anchors matched by IoU (foreground >= 0.7, background < 0.3, every box's
    best anchors foreground), `batch_size_per_image` anchors sampled per image with up to
    `positive_fraction` foreground; objectness BCE averaged over the sampled anchors of the batch, box
    smooth-L1 (beta 1/9) summed over the sampled foreground and divided by the same count.
    """

    def __init__(self, head: RPNHead, anchor_generator: AnchorGenerator, assigner: MaxIoUAssigner | None = None,
                 box_coder: BoxCoder | None = None, batch_size_per_image: int = 256, positive_fraction: float = 0.5,
                 pre_nms_top_n_train: int = 2000, post_nms_top_n_train: int = 2000, pre_nms_top_n_test: int = 1000,
                 post_nms_top_n_test: int = 1000, nms_thresh: float = 0.7, score_thresh: float = 0.0,
                 min_size: float = 1e-3) -> None:
        super().__init__()
        if anchor_generator.num_anchors != head.num_anchors:
            raise ValueError(f"anchor_generator gives {anchor_generator.num_anchors} anchors a location but the "
                             f"RPN head predicts {head.num_anchors}")
        counts = {"batch_size_per_image": batch_size_per_image, "pre_nms_top_n_train": pre_nms_top_n_train,
                  "post_nms_top_n_train": post_nms_top_n_train, "pre_nms_top_n_test": pre_nms_top_n_test,
                  "post_nms_top_n_test": post_nms_top_n_test}
        for name, value in counts.items():
            _positive_int(name, value)
        if not 0.0 < nms_thresh <= 1.0:
            raise ValueError(f"nms_thresh must lie in (0, 1], got {nms_thresh}")
        if not 0.0 <= positive_fraction <= 1.0:
            raise ValueError(f"positive_fraction must lie in [0, 1], got {positive_fraction}")
        self.head = head
        self.anchor_generator = anchor_generator
        self.strides = anchor_generator.strides
        self.assigner = assigner or MaxIoUAssigner(0.7, 0.3, allow_low_quality_matches=True)
        self.box_coder = box_coder or BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.pre_nms_top_n_train, self.post_nms_top_n_train = pre_nms_top_n_train, post_nms_top_n_train
        self.pre_nms_top_n_test, self.post_nms_top_n_test = pre_nms_top_n_test, post_nms_top_n_test
        self.nms_thresh = nms_thresh
        self.score_thresh = score_thresh
        self.min_size = min_size
        self.generator: torch.Generator | None = None  # sampling randomness; None: the global RNG

    @property
    def pre_nms_top_n(self) -> int:
        return self.pre_nms_top_n_train if self.training else self.pre_nms_top_n_test

    @property
    def post_nms_top_n(self) -> int:
        return self.post_nms_top_n_train if self.training else self.post_nms_top_n_test

    def anchors(self, feats: Sequence[Tensor]) -> Tensor:
        return self.anchor_generator([tuple(f.shape[-2:]) for f in feats], device=feats[0].device)  # (R, 4)

    def forward(self, feats: Sequence[Tensor], image_sizes: Tensor,
                targets: TargetBatch | None = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """[(B, C, H_l, W_l)] pyramid (the RPN's levels), image_sizes (B, 2) (H, W) of the unpadded images,
        targets for the losses -> proposals (B, P, 4) (detached), valid (B, P), losses ({} without targets);
        P <= post_nms_top_n is the most proposals an image kept."""
        if len(feats) != len(self.strides):
            raise ValueError(f"the RPN's anchors cover {len(self.strides)} levels (strides {self.strides}) but "
                             f"{len(feats)} feature maps were given")
        out = self.head(feats)
        anchors = self.anchors(feats)
        proposals, valid = self.select_proposals(out, anchors, [f.shape[-2] * f.shape[-1] for f in feats],
                                                 image_sizes)
        losses = {} if targets is None else self.compute_loss(out, anchors, targets)
        return proposals, valid, losses

    @torch.no_grad()
    def select_proposals(self, out: RPNOutput, anchors: Tensor, locations_per_level: Sequence[int],
                         image_sizes: Tensor) -> tuple[Tensor, Tensor]:
        objectness = out.objectness[..., 0].float()  # (B, R)
        b = objectness.shape[0]
        a = self.head.num_anchors
        idx, level = [], []
        start = 0
        for i, n in enumerate(locations_per_level):  # static level structure
            n *= a
            k = min(self.pre_nms_top_n, n)
            idx.append(objectness[:, start:start + n].topk(k, dim=1).indices + start)  # (B, k)
            level.append(torch.full((b, k), i, dtype=torch.int64, device=objectness.device))
            start += n
        idx, level = torch.cat(idx, dim=1), torch.cat(level, dim=1)  # (B, N)
        deltas = torch.gather(out.box_deltas.float(), 1, idx[..., None].expand(-1, -1, 4))  # (B, N, 4)
        boxes = clip_boxes(self.box_coder.decode(deltas, anchors[idx]), image_sizes)  # (B, N, 4)
        scores = torch.sigmoid(torch.gather(objectness, 1, idx))  # (B, N)
        wh = boxes[..., 2:] - boxes[..., :2]
        candidate = (wh >= self.min_size).all(dim=-1) & (scores >= self.score_thresh)
        dets = nms_detections(boxes, scores, level, candidate, len(locations_per_level), self.nms_thresh,
                              self.post_nms_top_n)
        # padded to the most proposals an image kept: the RoI heads then do no work on padding rows
        # beyond what batching needs (the rows are data-dependent here anyway, after NMS)
        length = max(1, max(d.boxes.shape[0] for d in dets))
        return pad_rows([d.boxes for d in dets], length, boxes)

    def compute_loss(self, out: RPNOutput, anchors: Tensor, targets: TargetBatch) -> dict[str, Tensor]:
        matched = self.assigner(anchors, targets)  # (B, R): box index, -1 background, -2 ignored
        gt_boxes, _ = gather_targets(targets, matched)
        valid = torch.ones_like(matched, dtype=torch.bool)
        idx, keep = sample_rois(matched, valid, self.batch_size_per_image, self.positive_fraction, self.generator)
        fg = torch.gather(matched, 1, idx) >= 0  # (B, S)
        num_sampled = keep.sum().clamp(min=1)
        logits = torch.gather(out.objectness[..., 0].float(), 1, idx)  # (B, S)
        obj = F.binary_cross_entropy_with_logits(logits, fg.float(), reduction="none")
        objectness_loss = torch.where(keep, obj, torch.zeros_like(obj)).sum() / num_sampled
        pos = (keep & fg).float()
        row = idx[..., None].expand(-1, -1, 4)
        target = self.box_coder.encode(torch.gather(gt_boxes, 1, row), anchors[idx])  # (B, S, 4)
        box_loss = smooth_l1_loss(torch.gather(out.box_deltas, 1, row), target, pos).sum() / num_sampled
        return {"rpn_objectness": objectness_loss, "rpn_box_regression": box_loss}
