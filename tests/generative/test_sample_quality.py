import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from cvzoo.generative.evaluate import ClassifierFeatures, class_agreement, frechet_distance
from cvzoo.types import Signature


class Prediction:
    def __init__(self, labels):
        self.labels = labels


class StubClassifier(nn.Module):
    """Features: the first four pixels after normalisation (x - 0.5) / 0.5; label: brighter left or right half."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))
        self.signature = Signature(in_channels=1, mean=(0.5,), std=(0.5,))

    def features(self, images):
        return images.flatten(1)[:, :4] + self.unused

    def predict(self, images):
        w = images.shape[-1]
        return Prediction((images[..., w // 2:].mean((1, 2, 3)) > images[..., :w // 2].mean((1, 2, 3))).long())


def closed_form_fid(a, b):
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_frechet_distance_equals_the_closed_form_on_the_features():
    g = torch.Generator().manual_seed(0)
    real = torch.rand(300, 1, 4, 4, generator=g)
    fake = (torch.rand(200, 1, 4, 4, generator=g) * 0.7 + 0.2).clamp(0, 1)
    extractor = ClassifierFeatures(StubClassifier(), image_size=4)
    assert extractor.num_features == 4
    fid = frechet_distance(extractor, real, fake, batch_size=64)
    expected = closed_form_fid((real.flatten(1)[:, :4].double().numpy() - 0.5) / 0.5,
                               (fake.flatten(1)[:, :4].double().numpy() - 0.5) / 0.5)
    assert fid == pytest.approx(expected, rel=1e-4, abs=1e-6)
    same = frechet_distance(extractor, real, [real[:150], real[150:]])
    assert abs(same) < 1e-4


def test_class_agreement_counts_hits():
    left = torch.zeros(3, 1, 4, 4)
    left[..., :2] = 1
    right = left.flip(-1)
    samples = torch.cat([left, right])
    labels = torch.tensor([0, 0, 1, 1, 1, 0])  # 0: left is brighter -> predicted 0
    assert class_agreement(StubClassifier(), samples, labels, batch_size=4) == pytest.approx(4 / 6)


def test_bad_input_is_named():
    clf = StubClassifier()
    with pytest.raises(ValueError, match="labels must be a \\(2,\\) tensor"):
        class_agreement(clf, torch.rand(2, 1, 4, 4), torch.tensor([1]))
    with pytest.raises(ValueError, match="samples must be floating"):
        class_agreement(clf, torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="fake holds 1 image"):
        frechet_distance(ClassifierFeatures(clf, 4), torch.rand(4, 1, 4, 4), torch.rand(1, 1, 4, 4))
    with pytest.raises(ValueError, match="classifier must have `signature`"):
        ClassifierFeatures(nn.Linear(2, 2), 4)
