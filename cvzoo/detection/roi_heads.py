"""RoI branches of two-stage detectors: each couples a head from `cvzoo.heads.roi` with its RoI pooler,
its targets, its loss and its decoding, for the whole batch at once.

RoIs are padded (B, S, 4) xyxy input pixels with a (B, S) mask. The box branch samples the RoIs every
branch trains on (`SampledRoIs`: sampled positives lead each image's rows, so per-object branches read
the first `num_positive_slots` rows only); at inference every branch runs on the box branch's
detections. Class indices are cvzoo's 0-based foreground classes; the box head's column 0 is the
background (torchvision's layout), so class c is column c + 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvzoo.detection.assigners import MaxIoUAssigner
from cvzoo.detection.boxes import clip_boxes
from cvzoo.detection.coders import BoxCoder
from cvzoo.detection.detector import _UNSET
from cvzoo.detection.losses import smooth_l1_loss
from cvzoo.detection.postprocess import nms_detections
from cvzoo.detection.roi import MultiLevelRoIAlign, sample_rois
from cvzoo.detection.roi_targets import heatmaps_to_keypoints, keypoint_targets, mask_targets, paste_masks
from cvzoo.detection.structures import Detections, TargetBatch
from cvzoo.heads.roi import Box3DHead, KeypointHead, MaskHead, ObjectAttributeHead, RoIBoxHead, RoIBoxOutput


class SampledRoIs(NamedTuple):
    boxes: Tensor  # (B, S, 4) sampled proposals (ground-truth boxes included), xyxy input pixels
    keep: Tensor  # (B, S) bool: a sampled row, not padding
    matched: Tensor  # (B, S) int64 row of the matched ground truth (meaningful where `positive`)
    positive: Tensor  # (B, S) bool: sampled foreground
    num_positive_slots: int  # positives occupy at most the first this-many rows of each image


def _gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, M, ...) rows picked by idx (B, S) -> (B, S, ...)."""
    return torch.gather(x, 1, idx.reshape(*idx.shape, *(1,) * (x.ndim - 2)).expand(*idx.shape, *x.shape[2:]))


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` over `mask` (same shape), 0 when the mask is empty; masked-out NaN never leaks."""
    return torch.where(mask, values, torch.zeros_like(values)).sum() / mask.sum().clamp(min=1)


class RoIBranch(nn.Module):
    """A per-object branch: `head` on RoIAlign features from `pooler`.

    Subclasses define `target_fields` (what `TargetBatch.from_list` must carry), `loss(features, rois,
    targets)` on the positive sampled RoIs, `predict(features, boxes, labels, valid, image_sizes)` on
    detections, and `raw(pooled_outputs)` for the detector's forward.
    """

    def __init__(self, head: nn.Module, pooler: MultiLevelRoIAlign) -> None:
        super().__init__()
        if not isinstance(pooler, MultiLevelRoIAlign):
            raise ValueError(f"pooler must be a MultiLevelRoIAlign, got {type(pooler).__name__}")
        self.head = head
        self.pooler = pooler

    def target_fields(self) -> dict[str, Any]:
        return {}

    @property
    def output_names(self) -> tuple[str, ...]:
        """The keys `predict` adds to each detection's extras."""
        return ()

    def pool(self, features: Mapping[int, Tensor], boxes: Tensor, valid: Tensor) -> Tensor:
        """{stride: (B, C, H, W)}, boxes (B, S, 4), valid (B, S) -> (B*S, C, S_h, S_w)."""
        missing = [s for s in self.pooler.strides if s not in features]
        if missing:
            raise ValueError(f"{type(self).__name__}'s pooler reads strides {self.pooler.strides} but the pyramid "
                             f"has {tuple(features)}")
        pooled = self.pooler([features[s] for s in self.pooler.strides], boxes, valid)  # (B, S, C, S_h, S_w)
        return pooled.flatten(0, 1)

    def positives(self, rois: SampledRoIs) -> tuple[Tensor, Tensor, Tensor]:
        """The leading rows that hold every image's sampled positives: (B, n, 4) boxes, (B, n) positive
        mask, (B, n) matched rows. Compiled, n is the static `num_positive_slots`; eager, n shrinks to the
        most positives an image has (one synchronisation), so the head runs on little more than the
        positives, as torchvision's per-image lists do."""
        n = rois.num_positive_slots
        if not torch.compiler.is_compiling():
            n = min(n, max(1, int(rois.positive[:, :n].sum(dim=1).max())))
        return rois.boxes[:, :n], rois.positive[:, :n], rois.matched[:, :n]

    def loss(self, features: Mapping[int, Tensor], rois: SampledRoIs, targets: TargetBatch) -> dict[str, Tensor]:
        raise NotImplementedError

    def predict(self, features: Mapping[int, Tensor], boxes: Tensor, labels: Tensor, valid: Tensor,
                image_sizes: Tensor) -> dict[str, Tensor]:
        """boxes (B, D, 4), labels (B, D), valid (B, D) detections -> {name: (B, D, ...)} (masks: (B, D, H, W)
        at the padded batch size)."""
        raise NotImplementedError


class BoxBranch(RoIBranch):
    """Fast R-CNN box branch: samples RoIs from proposals (ground-truth boxes added), classifies them
    (K + 1 way) and regresses per-class deltas (weights (10, 10, 5, 5)); torchvision's RoIHeads box part.

    Training: proposals matched at IoU 0.5 (no low-quality matches), `batch_size_per_image` sampled with
    up to `positive_fraction` foreground; cross-entropy averaged over the sampled RoIs of the batch,
    smooth-L1 (beta 1/9) on the true class's deltas of the foreground, divided by the same count.
    Inference: softmax, per-class boxes decoded and clipped, background dropped, scores above
    `score_thresh`, boxes at least `min_size` wide and high, NMS per class, `max_detections` an image.
    """

    def __init__(self, head: RoIBoxHead, pooler: MultiLevelRoIAlign, assigner: MaxIoUAssigner | None = None,
                 box_coder: BoxCoder | None = None, batch_size_per_image: int = 512, positive_fraction: float = 0.25,
                 score_thresh: float = 0.05, nms_thresh: float | None = 0.5, max_detections: int = 100,
                 min_size: float = 1e-2) -> None:
        super().__init__(head, pooler)
        if isinstance(batch_size_per_image, bool) or not isinstance(batch_size_per_image, int) \
                or batch_size_per_image < 1:
            raise ValueError(f"batch_size_per_image must be a positive int, got {batch_size_per_image!r}")
        if not 0.0 <= positive_fraction <= 1.0:
            raise ValueError(f"positive_fraction must lie in [0, 1], got {positive_fraction}")
        self.num_classes = head.num_classes
        self.assigner = assigner or MaxIoUAssigner(0.5, 0.5, allow_low_quality_matches=False)
        self.box_coder = box_coder or BoxCoder((10.0, 10.0, 5.0, 5.0))
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.max_detections = max_detections
        self.min_size = min_size
        self.generator: torch.Generator | None = None  # sampling randomness; None: the global RNG

    def sample(self, proposals: Tensor, valid: Tensor, targets: TargetBatch) -> SampledRoIs:
        """proposals (B, P, 4), valid (B, P) -> the sampled RoIs (B, S), ground-truth boxes among the candidates."""
        boxes = torch.cat([proposals, targets.boxes.to(proposals.dtype)], dim=1)  # (B, P + M, 4)
        valid = torch.cat([valid, targets.valid], dim=1)
        boxes = torch.where(valid[..., None], boxes, torch.zeros((), dtype=boxes.dtype, device=boxes.device))
        matched = self.assigner(boxes, targets)  # (B, P + M)
        idx, keep = sample_rois(matched, valid, self.batch_size_per_image, self.positive_fraction, self.generator)
        matched = torch.gather(matched, 1, idx)
        return SampledRoIs(_gather_rows(boxes, idx), keep, matched.clamp(min=0), keep & (matched >= 0),
                           min(self.batch_size_per_image, int(self.batch_size_per_image * self.positive_fraction)))

    def raw(self, features: Mapping[int, Tensor], boxes: Tensor, valid: Tensor) -> RoIBoxOutput:
        """(B, S, 4) RoIs -> RoIBoxOutput((B, S, K + 1), (B, S, K + 1, 4))."""
        b, s = valid.shape
        out = self.head(self.pool(features, boxes, valid))
        return RoIBoxOutput(out.cls_logits.reshape(b, s, -1), out.box_deltas.reshape(b, s, -1, 4))

    def loss(self, features: Mapping[int, Tensor], rois: SampledRoIs, targets: TargetBatch) -> dict[str, Tensor]:
        out = self.raw(features, rois.boxes, rois.keep)
        gt_labels = torch.gather(targets.labels, 1, rois.matched)  # (B, S)
        cls_target = torch.where(rois.positive, gt_labels + 1, torch.zeros_like(gt_labels))  # 0: background
        ce = F.cross_entropy(out.cls_logits.float().flatten(0, 1), cls_target.flatten(), reduction="none")
        num = rois.keep.sum().clamp(min=1)
        classification = torch.where(rois.keep.flatten(), ce, torch.zeros_like(ce)).sum() / num
        deltas = torch.gather(out.box_deltas, 2, cls_target[..., None, None].expand(-1, -1, 1, 4))[:, :, 0]
        target = self.box_coder.encode(_gather_rows(targets.boxes, rois.matched), rois.boxes)  # (B, S, 4)
        box = smooth_l1_loss(deltas, target, rois.positive.float()).sum() / num
        return {"roi_classification": classification, "roi_box_regression": box}

    def decode(self, out: RoIBoxOutput, boxes: Tensor, image_sizes: Tensor) -> tuple[Tensor, Tensor]:
        """-> foreground class probabilities (B, S, K) and per-class boxes (B, S, K, 4), clipped."""
        scores = torch.softmax(out.cls_logits.float(), dim=-1)[..., 1:]
        per_class = self.box_coder.decode(out.box_deltas.float()[:, :, 1:], boxes[:, :, None].float())
        b, s, k = scores.shape
        return scores, clip_boxes(per_class.reshape(b, s * k, 4), image_sizes).reshape(b, s, k, 4)

    def detect(self, features: Mapping[int, Tensor], proposals: Tensor, valid: Tensor, image_sizes: Tensor,
               score_thresh: float | None = None, nms_thresh: float | None = _UNSET,
               max_detections: int | None = None) -> list[Detections]:
        """Detections of proposals (B, P, 4); settings left out take the branch's (`nms_thresh=None`: no NMS)."""
        score_thresh = self.score_thresh if score_thresh is None else score_thresh
        nms_thresh = self.nms_thresh if nms_thresh is _UNSET else nms_thresh
        max_detections = self.max_detections if max_detections is None else max_detections
        scores, boxes = self.decode(self.raw(features, proposals, valid), proposals, image_sizes)
        b, s, k = scores.shape
        labels = torch.arange(k, device=scores.device).expand(b, s, k)
        wh = boxes[..., 2:] - boxes[..., :2]
        candidate = valid[..., None] & (scores > score_thresh) & (wh >= self.min_size).all(dim=-1)
        return nms_detections(boxes.reshape(b, s * k, 4), scores.reshape(b, -1), labels.reshape(b, -1),
                              candidate.reshape(b, -1), k, nms_thresh, max_detections)


class MaskBranch(RoIBranch):
    """Mask R-CNN branch: per-class mask logits on the positive RoIs; the target is the matched instance
    mask RoIAligned into the RoI (torchvision's `project_masks_on_boxes`), the loss the BCE of the true
    class's map averaged over pixels and positives. At inference the detected class's map, sigmoid,
    pasted into the image (torchvision's `paste_masks_in_image`): "masks" (N, H, W) probabilities."""

    def __init__(self, head: MaskHead, pooler: MultiLevelRoIAlign) -> None:
        super().__init__(head, pooler)

    def target_fields(self) -> dict[str, Any]:
        return {"masks": True}

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("masks",)

    def loss(self, features, rois, targets):
        if targets.masks is None:
            raise ValueError("MaskBranch needs instance masks in the targets ('masks' per image)")
        boxes, pos, matched = self.positives(rois)
        logits = self.head(self.pool(features, boxes, pos))  # (B n, K, M, M)
        labels = torch.gather(targets.labels, 1, matched).clamp(min=0).flatten()  # (B n,)
        logit = logits[torch.arange(labels.numel(), device=labels.device), labels]  # (B n, M, M)
        target = mask_targets(targets.masks, matched, boxes, tuple(logit.shape[-2:])).flatten(0, 1)
        target = torch.where(pos.flatten()[:, None, None], target, torch.zeros_like(target))
        bce = F.binary_cross_entropy_with_logits(logit.float(), target, reduction="none").mean(dim=(1, 2))
        return {"mask": _masked_mean(bce, pos.flatten())}

    def predict(self, features, boxes, labels, valid, image_sizes):
        b, d = valid.shape
        logits = self.head(self.pool(features, boxes, valid))  # (B D, K, M, M)
        flat = labels.clamp(min=0).flatten()
        probs = torch.sigmoid(logits[torch.arange(flat.numel(), device=flat.device), flat].float())  # (B D, M, M)
        h, w = (int(v) for v in image_sizes.max(dim=0).values)
        pasted = paste_masks(probs, boxes.flatten(0, 1).float(), (h, w))  # (B D, H, W)
        return {"masks": pasted.reshape(b, d, h, w)}


class KeypointBranch(RoIBranch):
    """Keypoint R-CNN branch: K heatmaps on the positive RoIs; the target of each labelled keypoint is
    its heatmap cell (torchvision's `keypoints_to_heatmap`), the loss the cross-entropy over each map's
    pixels averaged over labelled keypoints. Inference: "keypoints" (N, K, 3) x, y, 1 and
    "keypoint_scores" (N, K) from torchvision's `heatmaps_to_keypoints` rule."""

    def __init__(self, head: KeypointHead, pooler: MultiLevelRoIAlign) -> None:
        super().__init__(head, pooler)
        self.num_keypoints = head.num_keypoints

    def target_fields(self) -> dict[str, Any]:
        return {"num_keypoints": self.num_keypoints}

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("keypoints", "keypoint_scores")

    def loss(self, features, rois, targets):
        if targets.keypoints is None:
            raise ValueError("KeypointBranch needs 'keypoints' (N, K, 3) in the targets")
        boxes, pos, matched = self.positives(rois)
        logits = self.head(self.pool(features, boxes, pos))  # (B n, K, H, W)
        idx, labelled = keypoint_targets(_gather_rows(targets.keypoints, matched), boxes, logits.shape[-1])
        labelled = labelled & pos[..., None]  # (B, n, K)
        ce = F.cross_entropy(logits.float().flatten(2).flatten(0, 1), idx.flatten(), reduction="none")
        return {"keypoint": _masked_mean(ce, labelled.flatten())}

    def predict(self, features, boxes, labels, valid, image_sizes):
        b, d = valid.shape
        logits = self.head(self.pool(features, boxes, valid))  # (B D, K, H, W)
        kp, scores = heatmaps_to_keypoints(logits.float(), boxes.flatten(0, 1).float())
        return {"keypoints": kp.reshape(b, d, -1, 3), "keypoint_scores": scores.reshape(b, d, -1)}


class Box3DBranch(RoIBranch):
    """Monocular 3D boxes per object for a fixed pinhole `camera` (fx, fy, cx, cy in input pixels).

    Targets per object: "center3d" (x, y, z) in camera coordinates (z: depth along the optical axis),
    "size3d" (w, h, l) and "yaw" (radians). Codes: depth log(z / depth_scale); size log(size /
    reference_size); yaw as one of `num_yaw_bins` bins plus a residual in half-bin units; the projected
    centre's offset from the 2D box centre in box widths/heights. Losses: smooth-L1 on the codes,
    cross-entropy on the yaw bin, averaged over positives. Inference adds "center3d" (N, 3), "depth"
    (N,), "size3d" (N, 3), "yaw" (N,) in [-pi, pi).
    """

    def __init__(self, head: Box3DHead, pooler: MultiLevelRoIAlign, camera: Sequence[float],
                 depth_scale: float = 10.0, reference_size: Sequence[float] = (1.0, 1.0, 1.0)) -> None:
        super().__init__(head, pooler)
        camera = tuple(float(v) for v in camera)
        if len(camera) != 4 or camera[0] <= 0 or camera[1] <= 0:
            raise ValueError(f"camera must be (fx, fy, cx, cy) with positive focal lengths, got {camera}")
        if depth_scale <= 0 or len(reference_size) != 3 or min(reference_size) <= 0:
            raise ValueError(f"depth_scale and reference_size (three sizes) must be positive, got {depth_scale}, "
                             f"{tuple(reference_size)}")
        self.camera = camera
        self.depth_scale = float(depth_scale)
        self.register_buffer("reference_size", torch.tensor([float(v) for v in reference_size]), persistent=False)
        self.num_yaw_bins = head.num_yaw_bins

    def target_fields(self) -> dict[str, Any]:
        return {"attributes": {"center3d": (3,), "size3d": (3,), "yaw": ()}}

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("center3d", "depth", "size3d", "yaw")

    @property
    def bin_width(self) -> float:
        return 2 * math.pi / self.num_yaw_bins

    def loss(self, features, rois, targets):
        for name in ("center3d", "size3d", "yaw"):
            if name not in targets.attributes:
                raise ValueError(f"Box3DBranch needs {name!r} in the targets")
        boxes, pos, matched = self.positives(rois)
        out = self.head(self.pool(features, boxes, pos))
        shape = pos.shape
        center = _gather_rows(targets.attributes["center3d"], matched)  # (B, n, 3)
        size = _gather_rows(targets.attributes["size3d"], matched)
        yaw = _gather_rows(targets.attributes["yaw"], matched)  # (B, n)
        fx, fy, cx, cy = self.camera
        z = center[..., 2].clamp(min=1e-3)
        uv = torch.stack([fx * center[..., 0] / z + cx, fy * center[..., 1] / z + cy], dim=-1)  # projected centre
        bwh = (boxes[..., 2:] - boxes[..., :2]).clamp(min=1e-3)
        offset = (uv - (boxes[..., :2] + boxes[..., 2:]) / 2) / bwh  # (B, n, 2)
        yaw = torch.remainder(yaw + math.pi, 2 * math.pi)  # [0, 2 pi)
        bin_idx = torch.div(yaw, self.bin_width, rounding_mode="floor").long().clamp(max=self.num_yaw_bins - 1)
        residual = (yaw - (bin_idx + 0.5) * self.bin_width) / (self.bin_width / 2)  # [-1, 1]
        w = pos.float()
        depth_code = torch.log(z / self.depth_scale)
        size_code = torch.log(size.clamp(min=1e-3) / self.reference_size)
        res_pred = torch.gather(out.yaw_residual.reshape(*shape, -1), 2, bin_idx[..., None])  # (B, n, 1)
        num = pos.sum().clamp(min=1)
        yaw_ce = F.cross_entropy(out.yaw_logits.float(), bin_idx.flatten(), reduction="none").reshape(shape)
        return {
            "box3d_depth": smooth_l1_loss(out.depth.reshape(*shape, 1), depth_code[..., None], w).sum() / num,
            "box3d_size": smooth_l1_loss(out.size.reshape(*shape, 3), size_code, w).sum() / num,
            "box3d_yaw_bin": _masked_mean(yaw_ce, pos),
            "box3d_yaw_residual": smooth_l1_loss(res_pred, residual[..., None], w).sum() / num,
            "box3d_center": smooth_l1_loss(out.center_offset.reshape(*shape, 2), offset, w).sum() / num,
        }

    def predict(self, features, boxes, labels, valid, image_sizes):
        b, d = valid.shape
        out = self.head(self.pool(features, boxes, valid))
        z = self.depth_scale * torch.exp(out.depth.float()[:, 0]).reshape(b, d)
        size = self.reference_size * torch.exp(out.size.float()).reshape(b, d, 3)
        bin_idx = out.yaw_logits.argmax(dim=1, keepdim=True)
        res = torch.gather(out.yaw_residual.float(), 1, bin_idx)[:, 0]
        yaw = (bin_idx[:, 0] + 0.5 + res / 2) * self.bin_width - math.pi
        yaw = (torch.remainder(yaw + math.pi, 2 * math.pi) - math.pi).reshape(b, d)
        bwh = boxes[..., 2:] - boxes[..., :2]
        uv = (boxes[..., :2] + boxes[..., 2:]) / 2 + out.center_offset.float().reshape(b, d, 2) * bwh
        fx, fy, cx, cy = self.camera
        center = torch.stack([(uv[..., 0] - cx) * z / fx, (uv[..., 1] - cy) * z / fy, z], dim=-1)
        return {"center3d": center, "depth": z, "size3d": size, "yaw": yaw}


ATTRIBUTE_CODINGS = ("value", "box_points")


class AttributeBranch(RoIBranch):
    """Custom per-object outputs from an ObjectAttributeHead, trained on the matched ground truth.

    `codings[name]`: "value" (the target divided by `scales[name]`, default 1) or "box_points" (points
    (..., 2) in pixels, coded relative to the RoI: (x - x1) / w, (y - y1) / h, so e.g. the four corners of
    a garage door are learnt in box coordinates and returned in image pixels). Loss: smooth-L1 (beta
    `beta`) per element, averaged over elements and positives, one loss term "attribute_<name>" each.
    """

    def __init__(self, head: ObjectAttributeHead, pooler: MultiLevelRoIAlign,
                 codings: Mapping[str, str] | None = None, scales: Mapping[str, float] | None = None,
                 beta: float = 1.0 / 9) -> None:
        super().__init__(head, pooler)
        self.shapes = dict(head.shapes)
        self.codings = {name: "value" for name in self.shapes}
        for name, coding in (codings or {}).items():
            if name not in self.shapes:
                raise ValueError(f"codings names {name!r}, which the head does not predict (it has "
                                 f"{sorted(self.shapes)})")
            if coding not in ATTRIBUTE_CODINGS:
                raise ValueError(f"codings[{name!r}] must be one of {ATTRIBUTE_CODINGS}, got {coding!r}")
            if coding == "box_points" and (not self.shapes[name] or self.shapes[name][-1] != 2):
                raise ValueError(f"codings[{name!r}] = 'box_points' needs a (..., 2) output, the head predicts "
                                 f"{self.shapes[name]}")
            self.codings[name] = coding
        self.scales = {name: float((scales or {}).get(name, 1.0)) for name in self.shapes}
        bad = {n: s for n, s in self.scales.items() if not s > 0}
        if bad or set(scales or {}) - set(self.shapes):
            raise ValueError(f"scales must be positive numbers for attributes the head predicts, got {scales}")
        self.beta = beta

    def target_fields(self) -> dict[str, Any]:
        return {"attributes": self.shapes}

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(self.shapes)

    def encode(self, name: str, values: Tensor, boxes: Tensor) -> Tensor:
        if self.codings[name] == "box_points":
            extra = (1,) * (values.ndim - boxes.ndim)
            lo = boxes[..., :2].reshape(*boxes.shape[:-1], *extra, 2)
            wh = (boxes[..., 2:] - boxes[..., :2]).clamp(min=1e-3).reshape(*boxes.shape[:-1], *extra, 2)
            return (values - lo) / wh
        return values / self.scales[name]

    def decode(self, name: str, codes: Tensor, boxes: Tensor) -> Tensor:
        if self.codings[name] == "box_points":
            extra = (1,) * (codes.ndim - boxes.ndim)
            lo = boxes[..., :2].reshape(*boxes.shape[:-1], *extra, 2)
            wh = (boxes[..., 2:] - boxes[..., :2]).reshape(*boxes.shape[:-1], *extra, 2)
            return lo + codes * wh
        return codes * self.scales[name]

    def loss(self, features, rois, targets):
        boxes, pos, matched = self.positives(rois)
        out = self.head(self.pool(features, boxes, pos))
        losses = {}
        for name, shape in self.shapes.items():
            if name not in targets.attributes:
                raise ValueError(f"AttributeBranch needs {name!r} in the targets")
            target = self.encode(name, _gather_rows(targets.attributes[name], matched), boxes)  # (B, n, *shape)
            pred = out[name].float().reshape(target.shape)
            target = torch.where(pos.reshape(*pos.shape, *(1,) * len(shape)), target, pred.detach())
            err = F.smooth_l1_loss(pred, target, beta=self.beta, reduction="none")
            losses[f"attribute_{name}"] = _masked_mean(err.reshape(*pos.shape, -1).mean(-1), pos)
        return losses

    def predict(self, features, boxes, labels, valid, image_sizes):
        b, d = valid.shape
        out = self.head(self.pool(features, boxes, valid))
        return {name: self.decode(name, out[name].float().reshape(b, d, *shape), boxes.float())
                for name, shape in self.shapes.items()}
