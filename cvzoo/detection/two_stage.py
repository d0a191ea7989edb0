"""Two-stage detectors: backbone -> neck -> RPN -> RoI branches (box, and any per-object branches).

`TwoStageDetector` takes any set of RoI branches besides the box branch (masks, keypoints, 3D boxes,
custom attributes); `FasterRCNN`, `MaskRCNN` and `KeypointRCNN` build torchvision's defaults around a
given backbone and neck. Same call convention as the dense detectors: `forward(images)` raw tensors,
`loss(images, targets)` a dict with the total under "loss", `predict(images)` one `Detections` per
image whose `extras` hold each branch's outputs ("masks", "keypoints", "keypoint_scores", ...).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from cvzoo.detection.boxes import clip_boxes
from cvzoo.detection.detector import _UNSET, DetectorBase, ImagesArg, TargetsArg
from cvzoo.detection.roi import MultiLevelRoIAlign
from cvzoo.detection.roi_heads import BoxBranch, KeypointBranch, MaskBranch, RoIBranch
from cvzoo.detection.rpn import RegionProposalNetwork, pad_rows, rpn_anchor_generator
from cvzoo.detection.structures import Detections
from cvzoo.heads.roi import KeypointHead, MaskHead, RoIBoxHead, RPNHead
from cvzoo.types import check_increasing_strides


class TwoStageOutput(NamedTuple):
    cls_logits: Tensor  # (B, P, K + 1) box-head logits of the top-P proposals by objectness (column 0: background)
    box_deltas: Tensor  # (B, P, K + 1, 4) per-class deltas w.r.t. those proposals
    proposals: Tensor  # (B, P, 4) xyxy, decoded from the RPN (no NMS: pure tensor code)
    objectness: Tensor  # (B, P) RPN logits of those proposals
    branches: dict[str, object]  # each extra branch's raw head output on those proposals, tensors (B, P, ...)


class TwoStageDetector(DetectorBase):
    """backbone -> neck -> RegionProposalNetwork -> BoxBranch, plus named per-object `branches`.

    `rpn` reads the pyramid levels whose strides its anchors declare, each branch's pooler the levels of
    its own strides. `raw_proposals` is how many top-objectness proposals `forward` runs the heads on.
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module | None, rpn: RegionProposalNetwork,
                 box_branch: BoxBranch, branches: Mapping[str, RoIBranch] | None = None, pad_divisor: int = 32,
                 raw_proposals: int = 100) -> None:
        super().__init__(pad_divisor)
        self.backbone = backbone
        self.neck = neck
        self.rpn = rpn
        self.box_branch = box_branch
        self.branches = nn.ModuleDict(dict(branches or {}))
        self.num_classes = box_branch.num_classes
        feature_info = (neck if neck is not None else backbone).feature_info
        # levels are looked up by stride: each must be distinct (a dilated trunk needs a neck that resamples)
        check_increasing_strides(feature_info, "the detector's pyramid", type(self).__name__)
        self.strides = tuple(f.stride for f in feature_info)
        for name, part in (("rpn", rpn), ("box_branch", box_branch.pooler),
                           *((f"branches[{k!r}]", b.pooler) for k, b in self.branches.items())):
            missing = [s for s in part.strides if s not in self.strides]
            if missing:
                raise ValueError(f"{name} reads strides {part.strides} but the pyramid has {self.strides}")
        seen: dict[str, str] = {}
        for key, branch in self.branches.items():  # one owner per extras key and per target field
            names = set(branch.output_names) | set(branch.target_fields().get("attributes", {}))
            for n in sorted(names):
                if n in seen:
                    raise ValueError(f"branches {seen[n]!r} and {key!r} both use the name {n!r} (an output or a "
                                     "target field); rename one")
                seen[n] = key
        if isinstance(raw_proposals, bool) or not isinstance(raw_proposals, int) or raw_proposals < 1:
            raise ValueError(f"raw_proposals must be a positive int, got {raw_proposals!r}")
        self.raw_proposals = raw_proposals
        self.signature = backbone.signature.replace(outputs=TwoStageOutput._fields)

    def target_fields(self) -> dict:
        fields: dict = {}
        for branch in self.branches.values():
            for key, value in branch.target_fields().items():
                if key == "attributes":
                    fields.setdefault("attributes", {}).update(value)
                else:
                    fields[key] = value
        return fields

    # ---- composition ---------------------------------------------------------------------------

    def features(self, images: Tensor) -> dict[int, Tensor]:
        feats = self.backbone(images)
        feats = self.neck(feats) if self.neck is not None else feats
        return dict(zip(self.strides, feats))

    def forward(self, images: Tensor) -> TwoStageOutput:
        feats = self.features(images)
        rpn_feats = [feats[s] for s in self.rpn.strides]
        out = self.rpn.head(rpn_feats)
        anchors = self.rpn.anchors(rpn_feats)
        b = images.shape[0]
        k = min(self.raw_proposals, anchors.shape[0])
        objectness, idx = out.objectness[..., 0].topk(k, dim=1)  # (B, P) over all levels, no NMS
        deltas = torch.gather(out.box_deltas, 1, idx[..., None].expand(-1, -1, 4))
        size = torch.tensor(images.shape[-2:], device=images.device).expand(b, 2)
        proposals = clip_boxes(self.rpn.box_coder.decode(deltas, anchors[idx]), size)  # (B, P, 4)
        valid = torch.ones_like(objectness, dtype=torch.bool)
        box = self.box_branch.raw(feats, proposals, valid)
        branches = {name: _unflatten(br.head(br.pool(feats, proposals, valid)), b)
                    for name, br in self.branches.items()}
        return TwoStageOutput(box.cls_logits, box.box_deltas, proposals, objectness, branches)

    # ---- public boundary -----------------------------------------------------------------------

    def loss(self, images: ImagesArg, targets: TargetsArg) -> dict[str, Tensor]:
        batch, sizes = self.batch_images(images)
        targets = self.target_batch(targets, batch.shape[0], batch.device)
        feats = self.features(batch)
        proposals, valid, losses = self.rpn([feats[s] for s in self.rpn.strides], sizes, targets)
        rois = self.box_branch.sample(proposals, valid, targets)
        losses.update(self.box_branch.loss(feats, rois, targets))
        for branch in self.branches.values():
            losses.update(branch.loss(feats, rois, targets))
        losses["loss"] = sum(losses.values())
        return losses

    @torch.no_grad()
    def predict(self, images: ImagesArg, score_thresh: float | None = None, nms_thresh: float | None = _UNSET,
                max_detections: int | None = None) -> list[Detections]:
        """Detections per image, best first; `extras` hold every branch's outputs (masks pasted into each
        image at its own size). Arguments left out take the box branch's settings (`nms_thresh=None`
        turns NMS off)."""
        if score_thresh is not None and not 0.0 <= score_thresh < 1.0:
            raise ValueError(f"score_thresh must lie in [0, 1), got {score_thresh}")
        if nms_thresh is not None and nms_thresh is not _UNSET and not 0.0 < nms_thresh <= 1.0:
            raise ValueError(f"nms_thresh must lie in (0, 1] or be None, got {nms_thresh}")
        if max_detections is not None and (isinstance(max_detections, bool) or not isinstance(max_detections, int)
                                           or max_detections < 1):
            raise ValueError(f"max_detections must be a positive int, got {max_detections!r}")
        branch = self.box_branch
        batch, sizes = self.batch_images(images)
        feats = self.features(batch)
        proposals, valid, _ = self.rpn([feats[s] for s in self.rpn.strides], sizes)
        dets = branch.detect(feats, proposals, valid, sizes, score_thresh, nms_thresh, max_detections)
        if not self.branches:
            return dets
        length = max(1, max(d.boxes.shape[0] for d in dets))
        boxes, keep = pad_rows([d.boxes for d in dets], length, proposals)
        labels, _ = pad_rows([d.labels for d in dets], length, dets[0].labels)
        extras: dict[str, Tensor] = {}
        for branch in self.branches.values():
            extras.update(branch.predict(feats, boxes, labels, keep, sizes))
        out = []
        for i, d in enumerate(dets):  # split the padded (B, D, ...) outputs into images
            n = d.boxes.shape[0]
            h, w = (int(v) for v in sizes[i])
            mine = {k: (v[i, :n, :h, :w] if k == "masks" else v[i, :n]) for k, v in extras.items()}
            out.append(d._replace(extras=mine))
        return out

    def dense_predictions(self, images: ImagesArg) -> tuple[Tensor, Tensor]:
        """The top `raw_proposals` proposals' foreground class scores (B, P, K) and the box of each one's best
        class (B, P, 4), before NMS, differentiable (explanation targets, as the dense detectors')."""
        batch, sizes = self.batch_images(images)
        out = self(batch)
        scores, boxes = self.box_branch.decode(out, out.proposals, sizes)  # (B, P, K), (B, P, K, 4)
        best = scores.argmax(dim=-1)  # (B, P)
        return scores, torch.gather(boxes, 2, best[..., None, None].expand(-1, -1, 1, 4))[:, :, 0]


def _unflatten(out, b: int):
    """A head's (B * P, ...) output (a tensor, NamedTuple or dict of them) -> (B, P, ...)."""
    if isinstance(out, Tensor):
        return out.reshape(b, -1, *out.shape[1:])
    if isinstance(out, dict):
        return {k: _unflatten(v, b) for k, v in out.items()}
    return type(out)(*(_unflatten(v, b) for v in out))


def roi_pooler(strides: Sequence[int], size: int) -> MultiLevelRoIAlign:
    """torchvision's poolers: sampling ratio 2 over the stride-4..32 levels (P2-P5)."""
    return MultiLevelRoIAlign(size, 2, strides=tuple(s for s in strides if s <= 32))


def default_rpn(strides: Sequence[int], channels: int) -> RegionProposalNetwork:
    return RegionProposalNetwork(RPNHead(channels, 3), rpn_anchor_generator(strides))


class FasterRCNN(TwoStageDetector):
    """Faster R-CNN with FPN (torchvision's `fasterrcnn_resnet50_fpn` defaults) around any backbone and
    neck: the RPN on every pyramid level, RoIAlign 7x7 from levels of stride 4-32, a two-MLP box head."""

    def __init__(self, backbone: nn.Module, neck: nn.Module | None, num_classes: int,
                 rpn: RegionProposalNetwork | None = None, box_branch: BoxBranch | None = None,
                 branches: Mapping[str, RoIBranch] | None = None, representation_size: int = 1024,
                 pad_divisor: int = 32, **box_settings) -> None:
        info = (neck if neck is not None else backbone).feature_info
        strides, channels = tuple(f.stride for f in info), info[0].channels
        rpn = rpn or default_rpn(strides, channels)
        if box_branch is None:
            head = RoIBoxHead(channels, num_classes, 7, fc_sizes=(representation_size, representation_size))
            box_branch = BoxBranch(head, roi_pooler(strides, 7), **box_settings)
        elif box_settings:
            raise ValueError(f"box settings {sorted(box_settings)} apply to the default box branch only; pass them "
                             "to your BoxBranch")
        super().__init__(backbone, neck, rpn, box_branch, branches, pad_divisor)

    @classmethod
    def from_torchvision(cls, tv_model: nn.Module) -> FasterRCNN:
        """torchvision `fasterrcnn_resnet50_fpn` -> cvzoo FasterRCNN with the same weights and settings."""
        from cvzoo.detection.torchvision_interop import two_stage_from_torchvision

        return two_stage_from_torchvision(tv_model, cls)


class MaskRCNN(FasterRCNN):
    """Mask R-CNN: Faster R-CNN plus a MaskBranch (RoIAlign 14x14, four 3x3 convs, 28x28 masks)."""

    def __init__(self, backbone: nn.Module, neck: nn.Module | None, num_classes: int,
                 mask_branch: MaskBranch | None = None, **kwargs) -> None:
        info = (neck if neck is not None else backbone).feature_info
        if mask_branch is None:
            strides = tuple(f.stride for f in info)
            mask_branch = MaskBranch(MaskHead(info[0].channels, num_classes), roi_pooler(strides, 14))
        super().__init__(backbone, neck, num_classes, branches={"mask": mask_branch, **kwargs.pop("branches", {})},
                         **kwargs)


class KeypointRCNN(FasterRCNN):
    """Keypoint R-CNN: Faster R-CNN plus a KeypointBranch (RoIAlign 14x14, eight 3x3 convs, 56x56 heatmaps)."""

    def __init__(self, backbone: nn.Module, neck: nn.Module | None, num_classes: int, num_keypoints: int = 17,
                 keypoint_branch: KeypointBranch | None = None, **kwargs) -> None:
        info = (neck if neck is not None else backbone).feature_info
        if keypoint_branch is None:
            strides = tuple(f.stride for f in info)
            keypoint_branch = KeypointBranch(KeypointHead(info[0].channels, num_keypoints), roi_pooler(strides, 14))
        super().__init__(backbone, neck, num_classes,
                         branches={"keypoint": keypoint_branch, **kwargs.pop("branches", {})}, **kwargs)


