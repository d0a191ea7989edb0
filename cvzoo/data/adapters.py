"""torchvision datasets on disk, as samples in cvzoo's conventions.

Images are float32 `(3, H, W)` in [0, 1]. Detection targets are dicts with `boxes` (N, 4) float32 absolute
xyxy pixels (pixel `(row, col)` covers `[col, col + 1) x [row, row + 1)`) and `labels` (N,) int64;
classification targets are int64 0-d tensors. Nothing is downloaded: when the data is missing a
FileNotFoundError says where it was expected. `archive=` (a .tar/.tar.gz/.zip) is extracted into `root`
first, once (see `cvzoo.data.archive.extract_archive`). `transforms`, when given, is called on every
`(image, target)` pair and returns the pair to yield.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from cvzoo._optional import require
from cvzoo.data.archive import extract_archive
from cvzoo.data.info import DatasetInfo

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
VOC_IGNORE_INDEX = 255  # the void label of VOC's segmentation masks (object boundaries, difficult regions)

Transforms = Callable[[Tensor, object], tuple[Tensor, object]]
PathLike = str | os.PathLike


def read_rgb(path: PathLike) -> Tensor:
    """An image file -> (3, H, W) float32 in [0, 1] (grey, palette and RGBA images converted to RGB)."""
    from PIL import Image

    with Image.open(path) as im:
        array = np.asarray(im.convert("RGB"))  # (H, W, 3) uint8
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def _prepare(root: PathLike, archive: PathLike | None) -> Path:
    root = Path(root)
    if archive is not None:
        extract_archive(archive, root)
    return root


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: expected the folder {str(path)!r} (nothing is downloaded; "
                                "pass archive= to extract it from a local archive)")


class _Adapter(Dataset):
    info: DatasetInfo
    transforms: Transforms | None

    @property
    def classes(self) -> tuple[str, ...]:
        return self.info.classes

    def _out(self, image: Tensor, target: object) -> tuple[Tensor, object]:
        return (image, target) if self.transforms is None else self.transforms(image, target)


def _voc_root(root: Path, year: str, image_set: str) -> Path:
    from torchvision.datasets.voc import DATASET_YEAR_DICT

    key = "2007-test" if year == "2007" and image_set == "test" else year
    if key not in DATASET_YEAR_DICT:
        raise ValueError(f"year must be one of {sorted(k for k in DATASET_YEAR_DICT if '-' not in k)}, got {year!r}")
    voc_root = root / DATASET_YEAR_DICT[key]["base_dir"]
    _require_dir(voc_root, f"Pascal VOC {year}")
    return voc_root


def parse_voc_annotation(path: PathLike) -> dict[str, Tensor]:
    """A VOC XML annotation -> {"boxes": (N, 4) float32 xyxy, "labels": (N,) int64, "difficult": (N,) bool}.

    VOC boxes are 1-based inclusive pixel indices: `xmin=1, xmax=W` spans the whole width, which is
    `(0, W)` here; so `x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax` (as detectron2 reads them).
    Every object is kept, difficult and truncated ones included.
    """
    root = ET.parse(path).getroot()
    boxes, labels, difficult = [], [], []
    for obj in root.findall("object"):
        name = obj.findtext("name", "").strip()
        if name not in VOC_CLASSES:
            raise ValueError(f"{str(path)!r} has an object named {name!r}, which is not a VOC class {VOC_CLASSES}")
        box = obj.find("bndbox")
        xmin, ymin, xmax, ymax = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append([xmin - 1.0, ymin - 1.0, xmax, ymax])
        labels.append(VOC_CLASSES.index(name))
        difficult.append(obj.findtext("difficult", "0").strip() == "1")
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64), "difficult": torch.tensor(difficult, dtype=torch.bool)}


class VOCDetectionDataset(_Adapter):
    """Pascal VOC detection (torchvision's `VOCDetection` file lists) -> `(image, target)`.

    Reads `root/VOCdevkit/VOC<year>/` (`JPEGImages`, `Annotations`, `ImageSets/Main/<image_set>.txt`).
    Target: `boxes` (N, 4) float32 xyxy pixels, `labels` (N,) int64 in [0, 20) indexing `VOC_CLASSES`,
    `difficult` (N,) bool; no object is skipped (see `parse_voc_annotation` for the box convention).
    """

    def __init__(self, root: PathLike, year: str = "2012", image_set: str = "train", archive: PathLike | None = None,
                 transforms: Transforms | None = None) -> None:
        from torchvision.datasets import VOCDetection

        root = _prepare(root, archive)
        _voc_root(root, year, image_set)
        self.dataset = VOCDetection(root, year=year, image_set=image_set, download=False)
        self.transforms = transforms
        self.info = DatasetInfo(name="voc", task="detection", classes=VOC_CLASSES, in_channels=3, image_size=None,
                                target_fields=("boxes", "labels", "difficult"))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        return self._out(read_rgb(self.dataset.images[index]), parse_voc_annotation(self.dataset.annotations[index]))


class VOCSegmentationDataset(_Adapter):
    """Pascal VOC semantic segmentation -> `(image, mask)`, mask (H, W) int64.

    Mask values index `("background",) + VOC_CLASSES` (21 classes); 255 (`VOC_IGNORE_INDEX`) marks pixels
    to ignore. Reads `root/VOCdevkit/VOC<year>/` (`SegmentationClass`, `ImageSets/Segmentation`).
    """

    def __init__(self, root: PathLike, year: str = "2012", image_set: str = "train", archive: PathLike | None = None,
                 transforms: Transforms | None = None) -> None:
        from torchvision.datasets import VOCSegmentation

        root = _prepare(root, archive)
        _voc_root(root, year, image_set)
        self.dataset = VOCSegmentation(root, year=year, image_set=image_set, download=False)
        self.transforms = transforms
        self.info = DatasetInfo(name="voc-segmentation", task="segmentation", classes=("background", *VOC_CLASSES),
                                in_channels=3, image_size=None, target_fields=("mask",))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        from PIL import Image

        with Image.open(self.dataset.masks[index]) as im:  # a palette PNG: the pixel values are class indices
            if im.mode not in ("P", "L"):
                raise ValueError(f"{self.dataset.masks[index]!r} is a {im.mode} image; expected a palette (P) or "
                                 "grey (L) PNG of class indices")
            mask = torch.from_numpy(np.array(im)).long()
        return self._out(read_rgb(self.dataset.images[index]), mask)


class CIFAR10Dataset(_Adapter):
    """CIFAR-10 from `root/cifar-10-batches-py` (torchvision's python version) -> `(image (3, 32, 32), label)`."""

    def __init__(self, root: PathLike, train: bool = True, archive: PathLike | None = None,
                 transforms: Transforms | None = None) -> None:
        from torchvision.datasets import CIFAR10

        root = _prepare(root, archive)
        folder = root / CIFAR10.base_folder
        _require_dir(folder, "CIFAR-10")
        for name in [f for f, _ in CIFAR10.train_list + CIFAR10.test_list] + [CIFAR10.meta["filename"]]:
            if not (folder / name).is_file():
                raise FileNotFoundError(f"CIFAR-10 is incomplete: expected the file {str(folder / name)!r}")
        self.dataset = CIFAR10(root, train=train, download=False)
        self.images = torch.from_numpy(self.dataset.data).permute(0, 3, 1, 2)  # (N, 3, 32, 32) uint8
        self.labels = torch.tensor(self.dataset.targets, dtype=torch.int64)
        self.transforms = transforms
        self.info = DatasetInfo(name="cifar10", task="classification", classes=tuple(self.dataset.classes),
                                in_channels=3, image_size=(32, 32), target_fields=("label",))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self._out(self.images[index].float().div_(255.0), self.labels[index].clone())


class ImageFolderDataset(_Adapter):
    """A folder per class (`root/<class>/<image>`, torchvision's `ImageFolder`) -> `(image, label)`.

    Classes are the folder names in sorted order.
    """

    def __init__(self, root: PathLike, archive: PathLike | None = None, transforms: Transforms | None = None) -> None:
        from torchvision.datasets import ImageFolder

        root = _prepare(root, archive)
        _require_dir(root, "image folder")
        self.dataset = ImageFolder(root)
        self.transforms = transforms
        self.info = DatasetInfo(name="imagefolder", task="classification", classes=tuple(self.dataset.classes),
                                in_channels=3, image_size=None, target_fields=("label",))

    def __len__(self) -> int:
        return len(self.dataset.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        path, label = self.dataset.samples[index]
        return self._out(read_rgb(path), torch.tensor(label, dtype=torch.int64))


class COCODetectionDataset(_Adapter):
    """COCO-format detection (torchvision's `CocoDetection`) -> `(image, target)`.

    Target: `boxes` (N, 4) float32 xyxy pixels (COCO's `[x, y, w, h]` -> `[x, y, x + w, y + h]`, clipped
    to the image), `labels` (N,) int64: categories renumbered 0.. in order of sorted category id (`classes`
    holds their names), `image_id` int64 0-d, and with `masks=True` `masks` (N, H, W) bool (polygons and RLE
    decoded by pycocotools). Crowd annotations and boxes without area after clipping are dropped. Every
    image of the annotation file is kept, also those left without objects. Needs pycocotools.
    """

    def __init__(self, image_dir: PathLike, annotation_file: PathLike, masks: bool = False,
                 transforms: Transforms | None = None) -> None:
        image_dir, annotation_file = Path(image_dir), Path(annotation_file)
        if not annotation_file.is_file():
            raise FileNotFoundError(f"COCO annotations not found: expected the file {str(annotation_file)!r}")
        _require_dir(image_dir, "COCO images")
        require("pycocotools.coco", "metrics", "COCO datasets")
        from torchvision.datasets import CocoDetection

        self.dataset = CocoDetection(image_dir, str(annotation_file))
        coco = self.dataset.coco
        self.category_ids = tuple(sorted(coco.cats))
        self._label_of = {cat: i for i, cat in enumerate(self.category_ids)}
        self.masks = masks
        self.transforms = transforms
        fields = ("boxes", "labels", "image_id") + (("masks",) if masks else ())
        self.info = DatasetInfo(name="coco", task="detection",
                                classes=tuple(coco.cats[c]["name"] for c in self.category_ids), in_channels=3,
                                image_size=None, target_fields=fields)

    def __len__(self) -> int:
        return len(self.dataset.ids)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        coco = self.dataset.coco
        image_id = self.dataset.ids[index]
        meta = coco.imgs[image_id]
        image = read_rgb(Path(self.dataset.root) / meta["file_name"])
        h, w = image.shape[-2:]
        anns = [a for a in coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # (N,) degenerate boxes dropped
        target = {"boxes": boxes[keep],
                  "labels": torch.tensor([self._label_of[a["category_id"]] for a in anns], dtype=torch.int64)[keep],
                  "image_id": torch.tensor(image_id, dtype=torch.int64)}
        if self.masks:
            kept = [a for a, k in zip(anns, keep.tolist()) if k]
            planes = [torch.from_numpy(coco.annToMask(a)).bool() for a in kept]
            target["masks"] = torch.stack(planes) if planes else torch.zeros(0, h, w, dtype=torch.bool)
        return self._out(image, target)
