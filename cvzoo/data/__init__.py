"""Datasets in cvzoo's conventions: embedded toy sets, adapters of torchvision datasets, collate functions.

Images are float32 `(C, H, W)` in [0, 1] (models normalise). A detection sample is `(image, target)`,
target `{"boxes": (N, 4) float32 absolute xyxy pixels, "labels": (N,) int64, ...}`; a classification
sample is `(image, label)` with an int64 0-d label. Every dataset exposes `.info`, a `DatasetInfo`.

`import cvzoo.data` stays light: scikit-learn, scikit-image and pycocotools load only when used.
"""

from __future__ import annotations

from cvzoo.data.adapters import (
    VOC_CLASSES,
    VOC_IGNORE_INDEX,
    CIFAR10Dataset,
    COCODetectionDataset,
    ImageFolderDataset,
    VOCDetectionDataset,
    VOCSegmentationDataset,
    parse_voc_annotation,
    read_rgb,
)
from cvzoo.data.archive import extract_archive, extraction_marker, is_extracted
from cvzoo.data.collate import classification_collate, detection_collate, segmentation_collate
from cvzoo.data.coloured_digits import ColouredDigits
from cvzoo.data.digits import DIGIT_CLASSES, Digits
from cvzoo.data.info import DatasetInfo
from cvzoo.data.photos import PHOTO_NAMES, sample_photos
from cvzoo.data.registry import DATASETS, DatasetEntry, create_dataset, list_datasets
from cvzoo.data.robust import (
    DataLoadingError,
    RobustBatch,
    RobustDataset,
    RobustLoader,
    SkipRecord,
    SkipReport,
    robust_collate,
)
from cvzoo.data.segmentation_folder import SegmentationFolder
from cvzoo.data.shape_captions import ShapesCaptions
from cvzoo.data.shapes import CLASSES as SHAPES_CLASSES
from cvzoo.data.shapes import SEGMENTATION_CLASSES, Shapes, shape_price

__all__ = [
    "SEGMENTATION_CLASSES",
    "SegmentationFolder",
    "ShapesCaptions",
    "ColouredDigits",
    "segmentation_collate",
    "DATASETS",
    "DataLoadingError",
    "RobustBatch",
    "RobustDataset",
    "RobustLoader",
    "SkipRecord",
    "SkipReport",
    "robust_collate",
    "DIGIT_CLASSES",
    "PHOTO_NAMES",
    "SHAPES_CLASSES",
    "VOC_CLASSES",
    "VOC_IGNORE_INDEX",
    "CIFAR10Dataset",
    "COCODetectionDataset",
    "DatasetEntry",
    "DatasetInfo",
    "Digits",
    "ImageFolderDataset",
    "Shapes",
    "VOCDetectionDataset",
    "VOCSegmentationDataset",
    "classification_collate",
    "create_dataset",
    "detection_collate",
    "extract_archive",
    "extraction_marker",
    "is_extracted",
    "list_datasets",
    "parse_voc_annotation",
    "read_rgb",
    "sample_photos",
    "shape_price",
]
