"""Semantic segmentation from a folder of images and same-stem PNG masks of class indices.

    root/
        classes.txt         one class name per line (unless `classes=` is given); line k names label k
        images/a.jpg        any image format PIL reads (.png, .jpg, .jpeg, .bmp, .tif, .tiff, .webp)
        masks/a.png         a grey (L) or palette (P) PNG, same size as a.jpg: pixel value = class index

or the same `images/` and `masks/` under `root/<split>/` for each split.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cvzoo.data.adapters import PathLike, Transforms, _Adapter, read_rgb
from cvzoo.data.info import DatasetInfo

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MASK_MODES = ("L", "P", "I;16", "I", "1")  # PIL modes whose pixel values are the class indices themselves


def read_classes(path: PathLike) -> tuple[str, ...]:
    """A classes.txt -> its names, one a line (surrounding blanks stripped, empty lines skipped)."""
    names = tuple(line.strip() for line in Path(path).read_text().splitlines() if line.strip())
    if not names:
        raise ValueError(f"{str(path)!r} lists no class names; expected one name per line")
    return names


class SegmentationFolder(_Adapter):
    """Images and their class-index masks from a folder -> `(image (3, H, W) float32 in [0, 1], mask (H, W) int64)`.

    Each image `<image_dir>/<stem>.<ext>` is paired with the mask `<mask_dir>/<stem>.png`; items are in
    sorted file-name order. Mask values index `classes`; pixels equal to `ignore_index` are kept as they are
    (losses and metrics skip them). Masks without an image are not used.

    Args:
        root: the dataset folder.
        split: read `root/<split>/<image_dir>` and `root/<split>/<mask_dir>` when the folder `root/<split>`
            exists; otherwise (and when None) `root/<image_dir>` and `root/<mask_dir>`, so a folder without
            splits serves every split.
        image_dir, mask_dir: the names of the two subfolders.
        classes: the class names (label k is `classes[k]`); None reads them from `root/classes.txt`.
        ignore_index: the mask value of pixels to ignore; not a class index (`>= len(classes)` or negative).
        transforms: called on every `(image, mask)` pair; returns the pair to yield.

    Raises ValueError for a missing folder, an image without its mask, no images, no classes, and (when the
    item is read) a mask whose size differs from its image's or holding a value that is neither a class
    index nor `ignore_index`; each message names the file.
    """

    def __init__(self, root: PathLike, split: str | None = None, image_dir: str = "images", mask_dir: str = "masks",
                 classes: Sequence[str] | None = None, ignore_index: int = 255,
                 transforms: Transforms | None = None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"root must be an existing folder, got {str(root)!r}")
        base = root / split if split is not None and (root / split).is_dir() else root
        folders = {}
        for name, value in (("image_dir", image_dir), ("mask_dir", mask_dir)):
            folder = base / value
            if not folder.is_dir():
                where = f" (no split folder {str(root / split)!r} either)" if base is root and split else ""
                raise ValueError(f"{name}={value!r}: expected the folder {str(folder)!r}, which does not exist{where}")
            folders[name] = folder
        if classes is None:
            classes_file = root / "classes.txt"
            if not classes_file.is_file():
                raise ValueError(f"classes is None and there is no {str(classes_file)!r}: pass classes= or write "
                                 "one class name per line to that file")
            classes = read_classes(classes_file)
        classes = tuple(classes)
        if not classes or not all(isinstance(c, str) and c for c in classes) or len(set(classes)) != len(classes):
            raise ValueError(f"classes must be distinct non-empty names, at least one, got {classes!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int) or 0 <= ignore_index < len(classes):
            raise ValueError(f"ignore_index must be an integer outside the class indices [0, {len(classes)}), "
                             f"got {ignore_index!r}")
        images = sorted(p for p in folders["image_dir"].iterdir()
                        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not images:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {str(folders['image_dir'])!r}")
        self.samples: list[tuple[Path, Path]] = []
        for image in images:
            mask = folders["mask_dir"] / f"{image.stem}.png"
            if not mask.is_file():
                raise ValueError(f"the image {str(image)!r} has no mask: expected the file {str(mask)!r}")
            self.samples.append((image, mask))
        self.root, self.split, self.ignore_index = root, split, ignore_index
        self.transforms = transforms
        self.info = DatasetInfo(name="segmentation-folder", task="segmentation", classes=classes, in_channels=3,
                                image_size=None, target_fields=("mask",))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image_path, mask_path = self.samples[index]
        image = read_rgb(image_path)  # (3, H, W)
        mask = read_mask(mask_path)  # (H, W)
        if mask.shape != image.shape[1:]:
            raise ValueError(f"the mask {str(mask_path)!r} is {tuple(mask.shape)} (H, W) but its image "
                             f"{str(image_path)!r} is {tuple(image.shape[1:])}")
        bad = (mask >= len(self.classes)) | (mask < 0)
        bad &= mask != self.ignore_index
        if bool(bad.any()):  # data loading, not a model's hot path: one check per item
            raise ValueError(f"the mask {str(mask_path)!r} holds the value {int(mask[bad][0])}, which is neither a "
                             f"class index in [0, {len(self.classes)}) nor ignore_index={self.ignore_index}")
        return self._out(image, mask)


def read_mask(path: PathLike) -> Tensor:
    """A PNG of class indices (grey, palette or 16-bit grey) -> (H, W) int64, the pixel values as they are."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode not in MASK_MODES:
            raise ValueError(f"the mask {str(path)!r} is a {im.mode} image; expected one channel of class indices "
                             f"(PIL mode {' / '.join(MASK_MODES)}), e.g. a grey (L) or palette (P) PNG")
        array = np.array(im)  # (H, W), the palette indices for "P" (not their colours)
    return torch.from_numpy(array.astype(np.int64))
