"""SegmentationFolder (cvzoo/data/segmentation_folder.py): a tiny folder written here, read back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cvzoo.data import create_dataset, list_datasets
from cvzoo.data.info import DatasetInfo
from cvzoo.data.segmentation_folder import SegmentationFolder

CLASSES = ("background", "cat", "dog")


def _rgb(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _labels(seed: int, h: int, w: int, num_classes: int = 3, ignore: int = 255) -> np.ndarray:
    labels = np.random.default_rng(seed).integers(0, num_classes, size=(h, w)).astype(np.uint8)
    labels[0, :2] = ignore  # a few pixels to ignore
    return labels


def _write(base: Path, name: str, image: np.ndarray, mask: np.ndarray | None, palette: bool = False) -> None:
    (base / "images").mkdir(parents=True, exist_ok=True)
    (base / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(base / "images" / f"{name}.png")
    if mask is not None:
        m = Image.fromarray(mask)  # (H, W) uint8: a grey (L) image
        if palette:  # VOC-style: the pixel values are palette indices, shown in colour
            m = m.convert("P")
            m.putpalette([v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256)])
        m.save(base / "masks" / f"{name}.png")


def _as_image(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255


@pytest.fixture
def folder(tmp_path: Path) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    items = {"b": (_rgb(1, 5, 7), _labels(1, 5, 7)), "a": (_rgb(2, 6, 4), _labels(2, 6, 4))}
    for name, (image, mask) in items.items():
        _write(tmp_path, name, image, mask, palette=name == "a")
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n\n")  # a trailing blank line is skipped
    return tmp_path, items


def test_reads_images_and_masks(folder):
    root, items = folder
    ds = SegmentationFolder(root)
    assert len(ds) == 2
    assert ds.info == DatasetInfo("segmentation-folder", "segmentation", CLASSES, 3, None, ("mask",))
    assert ds.classes == CLASSES and ds.ignore_index == 255
    for i, name in enumerate(("a", "b")):  # sorted by file name
        image, mask = ds[i]
        want_image, want_mask = items[name]
        assert image.dtype == torch.float32 and torch.equal(image, _as_image(want_image))
        assert mask.dtype == torch.int64 and torch.equal(mask, torch.from_numpy(want_mask).long())
        assert int((mask == 255).sum()) == 2  # ignore_index is kept as it is


def test_splits_classes_argument_and_transforms(tmp_path):
    for split, seed in (("train", 3), ("val", 4)):
        _write(tmp_path / split, f"x{seed}", _rgb(seed, 4, 4), _labels(seed, 4, 4, num_classes=2))
    val = SegmentationFolder(tmp_path, split="val", classes=("sky", "sea"))  # no classes.txt needed
    assert len(val) == 1 and val.classes == ("sky", "sea")
    assert torch.equal(val[0][0], _as_image(_rgb(4, 4, 4)))
    flipped = SegmentationFolder(tmp_path, split="train", classes=("sky", "sea"),
                                 transforms=lambda image, mask: (image.flip(-1), mask.flip(-1)))
    assert torch.equal(flipped[0][1], torch.from_numpy(_labels(3, 4, 4, num_classes=2)).long().flip(-1))


def test_a_split_that_is_not_there_reads_the_flat_folder(folder):
    root, _ = folder
    assert len(SegmentationFolder(root, split="train")) == 2


def test_registry_entry(folder):
    root, items = folder
    assert "segmentation-folder" in list_datasets("segmentation")
    ds = create_dataset("segmentation-folder", split="train", root=root)
    assert isinstance(ds, SegmentationFolder) and torch.equal(ds[1][1], torch.from_numpy(items["b"][1]).long())
    with pytest.raises(ValueError, match="root"):
        create_dataset("segmentation-folder")


def test_errors_name_what_is_wrong(folder, tmp_path_factory):
    root, _ = folder
    with pytest.raises(ValueError, match="root must be an existing folder.*nowhere"):
        SegmentationFolder(root / "nowhere")
    with pytest.raises(ValueError, match=r"mask_dir='labels'.*does not exist"):
        SegmentationFolder(root, mask_dir="labels")
    with pytest.raises(ValueError, match=r"image_dir='pictures'.*does not exist.*no split folder.*test"):
        SegmentationFolder(root, split="test", image_dir="pictures")
    with pytest.raises(ValueError, match="classes must be distinct"):
        SegmentationFolder(root, classes=("cat", "cat"))
    with pytest.raises(ValueError, match="ignore_index must be an integer outside .*got 1"):
        SegmentationFolder(root, ignore_index=1)

    bare = tmp_path_factory.mktemp("bare")
    (bare / "images").mkdir()
    (bare / "masks").mkdir()
    with pytest.raises(ValueError, match="classes is None and there is no .*classes.txt"):
        SegmentationFolder(bare)
    (bare / "classes.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="lists no class names"):
        SegmentationFolder(bare)
    (bare / "images" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no images"):
        SegmentationFolder(bare, classes=CLASSES)

    _write(root, "c", _rgb(5, 3, 3), None)  # an image without its mask
    with pytest.raises(ValueError, match=r"c\.png.* has no mask: expected the file .*masks/c\.png"):
        SegmentationFolder(root)


def test_bad_masks_are_reported_when_read(tmp_path):
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    _write(tmp_path, "small", _rgb(6, 5, 6), _labels(6, 5, 5))  # the mask is one column short
    _write(tmp_path, "value", _rgb(7, 4, 4), np.full((4, 4), 7, dtype=np.uint8))  # 7 is no class
    _write(tmp_path, "colour", _rgb(8, 4, 4), None)
    Image.fromarray(_rgb(9, 4, 4)).save(tmp_path / "masks" / "colour.png")  # an RGB mask
    ds = SegmentationFolder(tmp_path)
    names = [p.stem for p, _ in ds.samples]
    with pytest.raises(ValueError, match=r"colour\.png.* is a RGB image"):
        ds[names.index("colour")]
    with pytest.raises(ValueError, match=r"small\.png.* is \(5, 5\) \(H, W\) but its image .*small\.png.* \(5, 6\)"):
        ds[names.index("small")]
    with pytest.raises(ValueError, match=r"value\.png.* holds the value 7, which is neither a class index in "
                                         r"\[0, 3\) nor ignore_index=255"):
        ds[names.index("value")]
    assert int(SegmentationFolder(tmp_path, classes=tuple("abcdefgh"))[names.index("value")][1].max()) == 7
