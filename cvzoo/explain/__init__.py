"""Explanations: the Grad-CAM family (class activation maps), their targets and overlays on the image;
lucid-style feature visualisation; sanity checks (cascading randomisation, pointing game).

Importing it does not import kornia (feature visualisation's transforms load it when they first run).
"""

from cvzoo.explain.cam import (
    BaseCAM,
    EigenCAM,
    GradCAM,
    GradCAMPlusPlus,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
    scale_cam,
)
from cvzoo.explain.features import (
    Objective,
    RandomTransforms,
    channel,
    class_logit,
    l2_penalty,
    neuron,
    save_png,
    total_variation,
    visualize,
)
from cvzoo.explain.overlay import COLORMAPS, apply_colormap, overlay
from cvzoo.explain.param import FourierImage, PixelImage
from cvzoo.explain.sanity import cascading_randomization, pointing_game, spearman
from cvzoo.explain.targets import (
    BoxScoreTarget,
    CAMTarget,
    ClassifierTarget,
    DetectionTarget,
    DetectorOutput,
    RegressionTarget,
)

__all__ = [
    "COLORMAPS",
    "FourierImage",
    "Objective",
    "PixelImage",
    "RandomTransforms",
    "cascading_randomization",
    "channel",
    "class_logit",
    "l2_penalty",
    "neuron",
    "pointing_game",
    "save_png",
    "spearman",
    "total_variation",
    "visualize",
    "BaseCAM",
    "BoxScoreTarget",
    "CAMTarget",
    "ClassifierTarget",
    "DetectionTarget",
    "DetectorOutput",
    "EigenCAM",
    "GradCAM",
    "GradCAMPlusPlus",
    "LayerCAM",
    "RegressionTarget",
    "ScoreCAM",
    "XGradCAM",
    "apply_colormap",
    "overlay",
    "scale_cam",
]
