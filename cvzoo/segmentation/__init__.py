"""Semantic segmentation: the Segmenter task model, its losses and metrics."""

from cvzoo.segmentation.baselines import NoopSegmenter
from cvzoo.segmentation.losses import dice_loss, lovasz_softmax_loss
from cvzoo.segmentation.metrics import SegmentationMetrics, evaluate_segmentation
from cvzoo.segmentation.segmenter import SegmentationOutput, SegmentationPrediction, Segmenter

__all__ = [
    "NoopSegmenter",
    "SegmentationMetrics",
    "SegmentationOutput",
    "SegmentationPrediction",
    "Segmenter",
    "dice_loss",
    "evaluate_segmentation",
    "lovasz_softmax_loss",
]
