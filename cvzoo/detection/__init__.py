"""Detection: boxes, priors, assigners, coders, losses, post-processing, dense and two-stage detectors."""

from cvzoo.detection.assigners import ATSSAssigner, FCOSAssigner, MaxIoUAssigner, gather_targets
from cvzoo.detection.boxes import (
    box_area,
    box_convert,
    clip_boxes,
    elementwise_giou,
    pairwise_giou,
    pairwise_iou,
    valid_boxes,
)
from cvzoo.detection.centernet import CenterNet
from cvzoo.detection.coders import BoxCoder, DistanceCoder, centerness
from cvzoo.detection.detector import DenseDetector, DetectorBase
from cvzoo.detection.evaluate import DetectionEvaluator, box3d_errors, evaluate
from cvzoo.detection.fcos import FCOS
from cvzoo.detection.heatmaps import CenterNetEncoder, CenterNetTargets, gaussian_radius
from cvzoo.detection.postprocess import batched_postprocess, nms_detections, select_topk
from cvzoo.detection.priors import AnchorGenerator, PointGenerator, retinanet_anchor_sizes
from cvzoo.detection.retinanet import ATSS, RetinaNet
from cvzoo.detection.roi import MultiLevelRoIAlign, sample_rois
from cvzoo.detection.roi_heads import (
    AttributeBranch,
    Box3DBranch,
    BoxBranch,
    KeypointBranch,
    MaskBranch,
    RoIBranch,
    SampledRoIs,
)
from cvzoo.detection.roi_targets import heatmaps_to_keypoints, keypoint_targets, mask_targets, paste_masks
from cvzoo.detection.rpn import RegionProposalNetwork, rpn_anchor_generator
from cvzoo.detection.structures import Detections, TargetBatch
from cvzoo.detection.two_stage import FasterRCNN, KeypointRCNN, MaskRCNN, TwoStageDetector, TwoStageOutput

__all__ = [
    "DetectorBase",
    "DetectionEvaluator",
    "box3d_errors",
    "nms_detections",
    "AttributeBranch",
    "Box3DBranch",
    "BoxBranch",
    "KeypointBranch",
    "MaskBranch",
    "RoIBranch",
    "SampledRoIs",
    "heatmaps_to_keypoints",
    "keypoint_targets",
    "mask_targets",
    "paste_masks",
    "RegionProposalNetwork",
    "rpn_anchor_generator",
    "FasterRCNN",
    "KeypointRCNN",
    "MaskRCNN",
    "TwoStageDetector",
    "TwoStageOutput",
    "ATSS",
    "ATSSAssigner",
    "AnchorGenerator",
    "BoxCoder",
    "CenterNet",
    "CenterNetEncoder",
    "CenterNetTargets",
    "DenseDetector",
    "Detections",
    "DistanceCoder",
    "FCOS",
    "FCOSAssigner",
    "MaxIoUAssigner",
    "MultiLevelRoIAlign",
    "PointGenerator",
    "RetinaNet",
    "TargetBatch",
    "batched_postprocess",
    "box_area",
    "box_convert",
    "centerness",
    "clip_boxes",
    "elementwise_giou",
    "evaluate",
    "gather_targets",
    "gaussian_radius",
    "pairwise_giou",
    "pairwise_iou",
    "retinanet_anchor_sizes",
    "sample_rois",
    "select_topk",
    "valid_boxes",
]
