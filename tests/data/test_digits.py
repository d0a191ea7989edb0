"""Digits: scikit-learn's load_digits, split by class, values checked against sklearn's own arrays."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cvzoo.data.digits import Digits, stratified_split

datasets = pytest.importorskip("sklearn.datasets")


@pytest.fixture(scope="module")
def raw():
    return datasets.load_digits()


def test_split_sizes_and_balance(raw):
    train, test = Digits("train"), Digits("test")
    counts = torch.bincount(torch.from_numpy(raw.target), minlength=10)
    want_test = sum(round(0.2 * int(n)) for n in counts)  # closed form: round(fraction * n_c) per class
    assert len(train) + len(test) == 1797 and len(test) == want_test
    test_counts = torch.bincount(test.labels, minlength=10)
    assert torch.equal(test_counts, torch.tensor([round(0.2 * int(n)) for n in counts]))
    assert not set(train.indices.tolist()) & set(test.indices.tolist())  # disjoint, and together all of it
    assert sorted(train.indices.tolist() + test.indices.tolist()) == list(range(1797))
    assert torch.equal(Digits("test").indices, test.indices)  # deterministic
    assert not torch.equal(Digits("test", seed=1).indices, test.indices)


def test_raw_size_gives_exactly_the_counts_over_16(raw):
    ds = Digits("train", image_size=8)
    for j in (0, 5, len(ds) - 1):
        image, label = ds[j]
        row = int(ds.indices[j])
        assert image.shape == (1, 8, 8) and image.dtype == torch.float32
        assert torch.equal(image[0], torch.from_numpy(raw.images[row]).float() / 16)
        assert torch.equal(image.flatten(), torch.from_numpy(raw.data[row]).float() / 16)
        assert label.dtype == torch.int64 and label.shape == () and int(label) == int(raw.target[row])


def test_resized_images_match_bilinear_interpolation(raw):
    ds = Digits("test", image_size=32, channels=3)
    image, label = ds[3]
    row = int(ds.indices[3])
    src = torch.from_numpy(raw.images[row]).float()[None, None] / 16
    want = F.interpolate(src, size=(32, 32), mode="bilinear", align_corners=False)[0, 0]
    assert image.shape == (3, 32, 32)
    for c in range(3):
        assert torch.allclose(image[c], want, atol=1e-6)
    # closed form: output j samples input (j + 0.5) / 4 - 0.5; j = 6 -> 1.125, weights 7/8 on row 1, 1/8 on row 2
    r = src[0, 0]
    want_66 = (0.875 * 0.875 * r[1, 1] + 0.875 * 0.125 * (r[1, 2] + r[2, 1]) + 0.125 * 0.125 * r[2, 2])
    assert torch.allclose(image[0, 6, 6], want_66, atol=1e-6)
    assert float(image.min()) >= 0 and float(image.max()) <= 1
    assert ds.info.in_channels == 3 and ds.info.image_size == (32, 32) and ds.info.classes[9] == "9"


def test_stratified_split_keeps_shares():
    labels = torch.tensor([0] * 10 + [1] * 30 + [2] * 5)
    train, test = stratified_split(labels, 0.2, seed=0)
    assert torch.equal(torch.bincount(labels[test], minlength=3), torch.tensor([2, 6, 1]))
    assert len(train) + len(test) == 45


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"split": "val"}, "split"), ({"image_size": 0}, "image_size"), ({"channels": 2}, "channels"),
    ({"test_fraction": 1.0}, "test_fraction"), ({"seed": "a"}, "seed"),
])
def test_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Digits(**kwargs)
