"""Image-level task models: classification, regression and multi-task (classification + regression + keypoints)."""

from cvzoo.classification.baselines import NoopClassifier, NoopMultiTask, NoopRegressor
from cvzoo.classification.classifier import ClassificationPrediction, ImageClassifier
from cvzoo.classification.multitask import MultiTaskModel
from cvzoo.classification.regressor import ImageRegressor

__all__ = ["ClassificationPrediction", "ImageClassifier", "ImageRegressor", "MultiTaskModel", "NoopClassifier",
           "NoopMultiTask", "NoopRegressor"]
