"""The explanation sanity checks on a classifier trained on Shapes (issue figures; about a minute on 2 cores)."""

from __future__ import annotations

import pytest

from cvzoo.explain import GradCAM, LayerCAM
from cvzoo.explain_check import run_shapes_check, train_shapes_classifier


@pytest.fixture(scope="module")
def classifier():
    return train_shapes_classifier()


@pytest.mark.slow
def test_layercam_points_at_the_object_and_fails_the_randomisation_as_it_should(classifier):
    check = run_shapes_check(classifier, method=LayerCAM, layer="backbone.layer2")
    assert check.accuracy >= 0.95
    assert check.pointing >= 0.8, check  # the peak is inside the object's box on >= 80% of test images
    rho = dict(check.randomization)
    assert rho["backbone.layer4"] < 0.5 and rho["backbone.conv1"] < 0.3, check.randomization


@pytest.mark.slow
def test_gradcam_maps_depend_on_the_weights(classifier):
    check = run_shapes_check(classifier, method=GradCAM, layer="backbone.layer3", num_images=128)
    rho = dict(check.randomization)
    assert rho["backbone.layer4"] < 0.5 and rho["backbone.conv1"] < 0.3, check.randomization
    assert check.pointing >= 0.5  # coarser than LayerCAM (stride 16 on 64 px images), well above chance
