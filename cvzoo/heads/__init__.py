"""Heads: feature maps -> raw prediction tensors (NamedTuples). They know nothing of targets."""

from cvzoo.heads.classification import ClassificationHead, ClassificationOutput
from cvzoo.heads.dense import (
    ATSSHead,
    ATSSOutput,
    CenterNetHead,
    CenterNetOutput,
    DenseOutput,
    FCOSHead,
    FCOSOutput,
    RetinaHead,
    group_norm_32,
)
from cvzoo.heads.multitask import MultiTaskHead
from cvzoo.heads.pooling import GlobalPool
from cvzoo.heads.regression import KeypointOutput, KeypointRegressionHead, RegressionHead, RegressionOutput
from cvzoo.heads.roi import (
    Box3DHead,
    Box3DOutput,
    KeypointHead,
    MaskHead,
    ObjectAttributeHead,
    RoIBoxHead,
    RoIBoxOutput,
    RPNHead,
    RPNOutput,
)
from cvzoo.heads.segmentation import ASPPHead, FCNHead, FPNSegHead, LRASPPHead, UNetDecoder

__all__ = [
    "ASPPHead",
    "FCNHead",
    "FPNSegHead",
    "LRASPPHead",
    "UNetDecoder",
    "Box3DHead",
    "Box3DOutput",
    "KeypointHead",
    "MaskHead",
    "ObjectAttributeHead",
    "RoIBoxHead",
    "RoIBoxOutput",
    "RPNHead",
    "RPNOutput",
    "ATSSHead",
    "ATSSOutput",
    "CenterNetHead",
    "CenterNetOutput",
    "DenseOutput",
    "FCOSHead",
    "FCOSOutput",
    "RetinaHead",
    "group_norm_32",
    "ClassificationHead",
    "ClassificationOutput",
    "GlobalPool",
    "KeypointOutput",
    "KeypointRegressionHead",
    "MultiTaskHead",
    "RegressionHead",
    "RegressionOutput",
]
