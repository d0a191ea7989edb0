"""Detection: boxes, priors, assigners, coders, losses, post-processing and the dense detectors."""

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
from cvzoo.detection.detector import DenseDetector
from cvzoo.detection.evaluate import evaluate
from cvzoo.detection.fcos import FCOS
from cvzoo.detection.heatmaps import CenterNetEncoder, CenterNetTargets, gaussian_radius
from cvzoo.detection.postprocess import batched_postprocess, select_topk
from cvzoo.detection.priors import AnchorGenerator, PointGenerator, retinanet_anchor_sizes
from cvzoo.detection.retinanet import ATSS, RetinaNet
from cvzoo.detection.roi import MultiLevelRoIAlign, sample_rois
from cvzoo.detection.structures import Detections, TargetBatch

__all__ = [
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
