"""Named datasets: the one table behind `create_dataset("shapes", split="val")` and the CLI.

Builders are small functions that call the dataset constructors; they take the split and keyword
arguments. The embedded datasets (`shapes*`, `digits`) need nothing on disk; the adapters need `root=`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from torch.utils.data import Dataset

from cvzoo.data.info import TASKS


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
    """A named dataset: `builder(split, **kwargs)` returns it; `extra` is the pip extra it needs, if any."""

    name: str
    builder: Callable[..., Dataset]
    task: str
    description: str
    extra: str | None = None
    needs_root: bool = False


def _shapes(task: str) -> Callable[..., Dataset]:
    def build(split: str, **kwargs) -> Dataset:
        from cvzoo.data.shapes import Shapes

        return Shapes(split=split, task=task, **kwargs)

    return build


def _digits(split: str, **kwargs) -> Dataset:
    from cvzoo.data.digits import Digits

    return Digits(split=split, **kwargs)


def _coloured_digits(split: str, **kwargs) -> Dataset:
    from cvzoo.data.coloured_digits import ColouredDigits

    return ColouredDigits(split=split, **kwargs)


def _shapes_captions(split: str, **kwargs) -> Dataset:
    from cvzoo.data.shape_captions import ShapesCaptions

    # training sees the 16 seen colour/shape pairs; held-out splits draw all 20 (zero-shot evaluation splits them)
    kwargs.setdefault("combinations", "seen" if split == "train" else "all")
    return ShapesCaptions(split=split, **kwargs)


def _voc(split: str, root: str, **kwargs) -> Dataset:
    from cvzoo.data.adapters import VOCDetectionDataset

    return VOCDetectionDataset(root, image_set=split, **kwargs)


def _voc_segmentation(split: str, root: str, **kwargs) -> Dataset:
    from cvzoo.data.adapters import VOCSegmentationDataset

    return VOCSegmentationDataset(root, image_set=split, **kwargs)


def _segmentation_folder(split: str, root: str, **kwargs) -> Dataset:
    from cvzoo.data.segmentation_folder import SegmentationFolder

    return SegmentationFolder(root, split=split, **kwargs)


def _cifar10(split: str, root: str, **kwargs) -> Dataset:
    from cvzoo.data.adapters import CIFAR10Dataset

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test' for cifar10, got {split!r}")
    return CIFAR10Dataset(root, train=split == "train", **kwargs)


def _imagefolder(split: str, root: str, **kwargs) -> Dataset:
    from cvzoo.data.adapters import ImageFolderDataset

    return ImageFolderDataset(Path(root) / split, **kwargs)


def _coco(split: str, root: str, year: str = "2017", **kwargs) -> Dataset:
    from cvzoo.data.adapters import COCODetectionDataset

    root = Path(root)
    return COCODetectionDataset(root / f"{split}{year}", root / "annotations" / f"instances_{split}{year}.json",
                                **kwargs)


DATASETS: dict[str, DatasetEntry] = {e.name: e for e in (
    DatasetEntry("shapes", _shapes("detection"), "detection",
                 "synthetic circles, squares, triangles, stars: boxes, masks, corner keypoints, price"),
    DatasetEntry("shapes-classification", _shapes("classification"), "classification",
                 "synthetic shapes, one per image: its class"),
    DatasetEntry("shapes-regression", _shapes("regression"), "regression",
                 "synthetic shapes, one per image: its price in [0, 1]"),
    DatasetEntry("shapes-multitask", _shapes("multitask"), "multitask",
                 "synthetic shapes, one per image: class, price and 4 normalised corner keypoints"),
    DatasetEntry("shapes-segmentation", _shapes("segmentation"), "segmentation",
                 "synthetic shapes: a (H, W) mask, 0 background and 1 + class per visible object"),
    DatasetEntry("digits", _digits, "classification", "scikit-learn's 8 x 8 handwritten digits, resized",
                 extra="data"),
    DatasetEntry("coloured-digits", _coloured_digits, "debiasing",
                 "digits painted in colours tied to the class in training (95%), random at test: a spurious cue",
                 extra="data"),
    DatasetEntry("shapes-captions", _shapes_captions, "captions",
                 "one coloured shape an image, captioned 'a red circle'; 4 colour/shape pairs held out of training"),
    DatasetEntry("voc", _voc, "detection", "Pascal VOC detection at root/VOCdevkit/VOC<year>", needs_root=True),
    DatasetEntry("voc-segmentation", _voc_segmentation, "segmentation",
                 "Pascal VOC semantic segmentation at root/VOCdevkit/VOC<year>", needs_root=True),
    DatasetEntry("segmentation-folder", _segmentation_folder, "segmentation",
                 "images and same-stem PNG class-index masks at root[/<split>]/{images,masks}, root/classes.txt",
                 needs_root=True),
    DatasetEntry("cifar10", _cifar10, "classification", "CIFAR-10 at root/cifar-10-batches-py (split train/test)",
                 needs_root=True),
    DatasetEntry("imagefolder", _imagefolder, "classification", "one folder per class at root/<split>/<class>",
                 needs_root=True),
    DatasetEntry("coco", _coco, "detection",
                 "COCO detection: images at root/<split><year>, root/annotations/instances_<split><year>.json",
                 needs_root=True),
)}


def list_datasets(task: str | None = None) -> list[str]:
    """Names of the registered datasets, all of them or those of one task."""
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be None or one of {TASKS}, got {task!r}")
    return [name for name, e in DATASETS.items() if task is None or e.task == task]


def create_dataset(name: str, split: str = "train", **kwargs) -> Dataset:
    """Builds the dataset `name` for `split`; keyword arguments go to its constructor (`root=` for adapters)."""
    entry = DATASETS.get(name)
    if entry is None:
        raise ValueError(f"unknown dataset {name!r}; known datasets are {list(DATASETS)}")
    if entry.needs_root and kwargs.get("root") is None:
        raise ValueError(f"dataset {name!r} reads files from disk and needs root=<folder>, got root=None")
    return entry.builder(split, **kwargs)
