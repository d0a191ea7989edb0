"""Image-level task models: classification and multi-task (classification + regression + keypoints)."""

from cvzoo.classification.classifier import ClassificationPrediction, ImageClassifier
from cvzoo.classification.multitask import MultiTaskModel

__all__ = ["ClassificationPrediction", "ImageClassifier", "MultiTaskModel"]
