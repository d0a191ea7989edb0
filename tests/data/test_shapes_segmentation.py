"""Shapes(task="segmentation") (cvzoo/data/shapes.py): the detection scenes as (H, W) class-index masks."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import default_collate

from cvzoo.data import create_dataset, list_datasets
from cvzoo.data.info import DatasetInfo
from cvzoo.data.shapes import CLASSES, SHAPES_TASKS, Shapes
from cvzoo.experiment import held_out_split

SMALL = {"image_size": 64, "min_size": 12, "max_size": 32}


@pytest.fixture(scope="module")
def pair() -> tuple[Shapes, Shapes]:
    """The same scenes twice: as detection targets and as segmentation masks."""
    kwargs = {"num_images": 24, "seed": 7, "min_objects": 1, "max_objects": 5, **SMALL}
    return Shapes("val", task="detection", **kwargs), Shapes("val", task="segmentation", **kwargs)


def _expected_mask(target: dict[str, torch.Tensor]) -> torch.Tensor:
    """The closed form, one object at a time: 1 + label on its visible pixels, 0 where no object is seen."""
    h, w = target["masks"].shape[-2:]
    expected = torch.zeros(h, w, dtype=torch.int64)
    for mask, label in zip(target["masks"], target["labels"].tolist()):
        assert not bool(expected[mask].any())  # visible masks are disjoint: no pixel is written twice
        expected[mask] = 1 + label
    return expected


def test_masks_are_the_union_of_the_visible_detection_masks(pair):
    detection, segmentation = pair
    seen = torch.zeros(len(CLASSES) + 1, dtype=torch.int64)
    many = 0
    for i in range(len(segmentation)):
        det_image, target = detection[i]
        image, mask = segmentation[i]
        assert torch.equal(image, det_image)  # the same scene, pixel for pixel
        assert mask.shape == (64, 64) and mask.dtype == torch.int64
        assert torch.equal(mask, _expected_mask(target))
        assert torch.equal(mask == 0, ~target["masks"].any(dim=0))  # background exactly where nothing is seen
        seen += torch.bincount(mask.flatten(), minlength=len(CLASSES) + 1)
        many += len(target["labels"]) > 1
    assert bool((seen > 0).all())  # background and every class appear
    assert many > 0  # several objects per image: min_objects/max_objects apply, unlike the single-object tasks


def test_info_and_classes():
    ds = Shapes("test", num_images=3, task="segmentation", **SMALL)
    assert ds.info == DatasetInfo("shapes-segmentation", "segmentation", ("background", *CLASSES), 3, (64, 64),
                                  ("mask",), keypoint_flip=None)
    assert ds.classes == ds.info.classes and ds.info.num_classes == len(CLASSES) + 1
    assert "segmentation" in SHAPES_TASKS
    with pytest.raises(ValueError, match="task must be one of .*'segmentation'.*got 'panoptic'"):
        Shapes(task="panoptic")


def test_empty_scenes_are_all_background():
    ds = Shapes("train", num_images=3, task="segmentation", min_objects=0, max_objects=0, **SMALL)
    for i in range(3):
        assert torch.equal(ds[i][1], torch.zeros(64, 64, dtype=torch.int64))


def test_items_are_stable_and_fresh():
    a = Shapes("train", num_images=4, task="segmentation", seed=2, **SMALL)
    b = Shapes("train", num_images=4, task="segmentation", seed=2, cache=False, **SMALL)
    for i in (3, 0):
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
    a[1][1].fill_(9)  # a returned mask is the caller's: changing it leaves the dataset alone
    assert int(a[1][1].max()) <= len(CLASSES)


def test_samples_collate_into_a_batch():
    ds = Shapes("val", num_images=4, task="segmentation", **SMALL)
    images, masks = default_collate([ds[i] for i in range(4)])
    assert images.shape == (4, 3, 64, 64) and masks.shape == (4, 64, 64) and masks.dtype == torch.int64


def test_registry_entry():
    assert "shapes-segmentation" in list_datasets("segmentation")
    split = held_out_split("shapes-segmentation")
    ds = create_dataset("shapes-segmentation", split=split, num_images=2, seed=4, **SMALL)
    direct = Shapes(split, num_images=2, seed=4, task="segmentation", **SMALL)
    assert isinstance(ds, Shapes) and ds.info.task == "segmentation" and ds.info.name == "shapes-segmentation"
    assert torch.equal(ds[1][0], direct[1][0]) and torch.equal(ds[1][1], direct[1][1])
