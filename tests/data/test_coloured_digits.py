import pytest
import torch

from cvzoo.data import Digits, create_dataset
from cvzoo.data.coloured_digits import COLOURS, ColouredDigits

pytestmark = pytest.mark.usefixtures("one_thread")


def test_colours_share_one_brightness_and_differ_in_hue():
    assert torch.allclose(COLOURS.sum(1), torch.full((10,), 1.5))
    assert torch.cdist(COLOURS, COLOURS).add(torch.eye(10)).min() > 0.2


def test_train_colours_follow_the_class_and_test_colours_do_not():
    train, test = ColouredDigits("train"), ColouredDigits("test")
    match_train = (train.colours == train.labels).float().mean()
    match_test = (test.colours == test.labels).float().mean()
    # train: 95% kept plus 5% x 1/10 random draws that happen to match
    assert 0.93 < match_train < 0.98
    assert match_test < 0.2
    assert len(set(test.colours.tolist())) == 10


def test_images_are_the_grey_digits_painted_in_their_colour():
    coloured = ColouredDigits("test", image_size=16)
    grey = Digits("test", image_size=16, channels=1)
    image, target = coloured[5]
    assert torch.allclose(image, grey.images[5] * COLOURS[target["colour"]][:, None, None])
    assert target["label"] == grey.labels[5]
    assert coloured.info.task == "debiasing" and coloured.info.target_fields == ("label", "colour")


def test_registry_and_arguments():
    assert isinstance(create_dataset("coloured-digits", split="test"), ColouredDigits)
    assert (ColouredDigits("train", correlation=1.0).colours == ColouredDigits("train").labels).all()
    with pytest.raises(ValueError, match="correlation"):
        ColouredDigits("train", correlation=1.5)
