"""Collate functions: detection targets stay per image; images stack when their sizes agree."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from cvzoo.data.collate import classification_collate, detection_collate
from cvzoo.data.shapes import Shapes


def _target(n: int) -> dict[str, torch.Tensor]:
    return {"boxes": torch.rand(n, 4), "labels": torch.arange(n)}


def test_equal_sizes_stack():
    batch = [(torch.rand(3, 8, 10), _target(2)), (torch.rand(3, 8, 10), _target(0))]
    images, targets = detection_collate(batch)
    assert images.shape == (2, 3, 8, 10)
    assert torch.equal(images[1], batch[1][0])
    assert targets[0] is batch[0][1] and targets[1] is batch[1][1]


def test_different_sizes_give_a_list():
    batch = [(torch.rand(3, 8, 10), _target(1)), (torch.rand(3, 9, 10), _target(3))]
    images, targets = detection_collate(batch)
    assert isinstance(images, list) and [im.shape for im in images] == [(3, 8, 10), (3, 9, 10)]
    assert [len(t["labels"]) for t in targets] == [1, 3]


def test_bad_batches():
    with pytest.raises(ValueError, match="batch"):
        detection_collate([])
    with pytest.raises(ValueError, match=r"batch\[1\]"):
        detection_collate([(torch.rand(3, 4, 4), _target(1)), torch.rand(3, 4, 4)])


def test_classification_collate_is_torch_default_collate():
    batch = [(torch.full((1, 4, 4), float(i)), torch.tensor(i)) for i in range(3)]
    images, labels = classification_collate(batch)
    assert images.shape == (3, 1, 4, 4) and torch.equal(images[:, 0, 0, 0], torch.tensor([0.0, 1.0, 2.0]))
    assert labels.dtype == torch.int64 and torch.equal(labels, torch.tensor([0, 1, 2]))


def test_with_a_dataloader_over_shapes():
    ds = Shapes("val", num_images=4, image_size=64, max_size=32)
    images, targets = next(iter(DataLoader(ds, batch_size=4, collate_fn=detection_collate)))
    assert images.shape == (4, 3, 64, 64) and len(targets) == 4
    for i in range(4):
        image, target = ds[i]
        assert torch.equal(images[i], image)
        assert torch.equal(targets[i]["boxes"], target["boxes"]) and torch.equal(targets[i]["masks"], target["masks"])
