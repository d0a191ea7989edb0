"""Augmentation on kornia: presets for classification, detection and segmentation, box/mask/keypoint-aware
geometry, and cut/mix methods. Images are float (B, C, H, W) in [0, 1]; detection targets are torchvision-style
dicts with `boxes` absolute xyxy (continuous pixel coordinates) and keypoints in pixel-index coordinates;
segmentation masks are (B, H, W) int64 class indices.

Importing this package does not import kornia; the constructors that need it do.
"""

from cvzoo.augment.detection import DetectionMixUp, Mosaic, mosaic
from cvzoo.augment.geometry import DetectionTransform
from cvzoo.augment.mix import CutMix, Cutout, MixUp
from cvzoo.augment.presets import (
    PRESETS,
    ClassificationAugment,
    DetectionAugment,
    classification_transforms,
    detection_transforms,
)
from cvzoo.augment.segmentation import SegmentationAugment, SegmentationTransform, segmentation_transforms

__all__ = [
    "PRESETS",
    "ClassificationAugment",
    "CutMix",
    "Cutout",
    "DetectionAugment",
    "DetectionMixUp",
    "DetectionTransform",
    "MixUp",
    "Mosaic",
    "SegmentationAugment",
    "SegmentationTransform",
    "classification_transforms",
    "detection_transforms",
    "mosaic",
    "segmentation_transforms",
]
