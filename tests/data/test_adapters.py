"""Adapters of torchvision datasets: tiny datasets written here, read back in cvzoo's conventions."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cvzoo.data.adapters import (
    VOC_CLASSES,
    CIFAR10Dataset,
    COCODetectionDataset,
    ImageFolderDataset,
    VOCDetectionDataset,
    VOCSegmentationDataset,
    parse_voc_annotation,
    read_rgb,
)
from cvzoo.data.collate import detection_collate


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def _pixels(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_read_rgb_converts_grey_and_rgba(tmp_path):
    rgb = _pixels(0, 5, 7)
    _png(tmp_path / "rgb.png", rgb)
    assert torch.equal(read_rgb(tmp_path / "rgb.png"), torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    grey = rgb[..., 0]
    _png(tmp_path / "grey.png", grey)
    assert torch.equal(read_rgb(tmp_path / "grey.png"), torch.from_numpy(grey).float().expand(3, 5, 7) / 255)
    rgba = np.concatenate([rgb, np.full((5, 7, 1), 9, dtype=np.uint8)], axis=-1)
    _png(tmp_path / "rgba.png", rgba)
    assert torch.equal(read_rgb(tmp_path / "rgba.png"), read_rgb(tmp_path / "rgb.png"))  # alpha dropped


def test_parse_voc_annotation_keeps_every_object(tmp_path):
    xml = tmp_path / "a.xml"
    xml.write_text("<annotation><object><name>cat</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>10</xmax>"
                   "<ymax>20.5</ymax></bndbox></object><object><name>person</name><difficult>1</difficult>"
                   "<truncated>1</truncated><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>5</xmax><ymax>6</ymax>"
                   "</bndbox><part><name>head</name><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>5</xmax><ymax>5</ymax>"
                   "</bndbox></part></object></annotation>")
    t = parse_voc_annotation(xml)
    assert torch.equal(t["boxes"], torch.tensor([[0.0, 1.0, 10.0, 20.5], [4.0, 4.0, 5.0, 6.0]]))
    assert t["labels"].tolist() == [VOC_CLASSES.index("cat"), VOC_CLASSES.index("person")]
    assert t["difficult"].tolist() == [False, True]
    empty = tmp_path / "empty.xml"
    empty.write_text("<annotation><filename>x.jpg</filename></annotation>")
    e = parse_voc_annotation(empty)
    assert e["boxes"].shape == (0, 4) and e["labels"].dtype == torch.int64 and e["difficult"].dtype == torch.bool
    bad = tmp_path / "bad.xml"
    bad.write_text("<annotation><object><name>unicorn</name></object></annotation>")
    with pytest.raises(ValueError, match="unicorn"):
        parse_voc_annotation(bad)


def test_voc_segmentation_masks_keep_the_ignore_index(tmp_path):
    base = tmp_path / "VOCdevkit" / "VOC2012"
    mask = np.zeros((6, 8), dtype=np.uint8)
    mask[1:4, 2:6] = 15  # person
    mask[1:4, 6] = 255  # void boundary
    palette_mask = Image.fromarray(mask, mode="L").convert("P")
    (base / "SegmentationClass").mkdir(parents=True)
    palette_mask.save(base / "SegmentationClass" / "img.png")
    image = _pixels(1, 6, 8)
    (base / "JPEGImages").mkdir()
    Image.fromarray(image).save(base / "JPEGImages" / "img.jpg", format="PNG")  # PNG content: exact pixels
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("img\n")
    ds = VOCSegmentationDataset(tmp_path, image_set="val")
    x, m = ds[0]
    assert torch.equal(x, torch.from_numpy(image).permute(2, 0, 1).float() / 255)
    assert m.dtype == torch.int64 and torch.equal(m, torch.from_numpy(mask).long())
    assert ds.info.classes[15] == "person" and ds.info.task == "segmentation" and len(ds.info.classes) == 21


def test_missing_data_says_where_it_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="VOC2012"):
        VOCDetectionDataset(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        CIFAR10Dataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderDataset(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="instances.json"):
        COCODetectionDataset(tmp_path, tmp_path / "instances.json")
    with pytest.raises(ValueError, match="year"):
        VOCDetectionDataset(tmp_path, year="1999")


def test_image_folder(tmp_path):
    images = {("cat", "a.png"): _pixels(2, 9, 11), ("cat", "b.png"): _pixels(3, 4, 4),
              ("ant", "c.png"): _pixels(4, 8, 8)}
    for (cls, name), array in images.items():
        _png(tmp_path / cls / name, array)
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == ("ant", "cat") and len(ds) == 3
    got = {(ds.classes[int(label)], Path(path).name): ds[i] for i, (path, label) in enumerate(ds.dataset.samples)}
    for key, array in images.items():
        image, label = got[key]
        assert torch.equal(image, torch.from_numpy(array).permute(2, 0, 1).float() / 255)
        assert label.dtype == torch.int64 and label.shape == () and ds.classes[int(label)] == key[0]


def _write_cifar(root: Path) -> dict[str, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(2, 3072), dtype=np.uint8)  # rows: R plane, G plane, B plane of 32 x 32
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": [3, 7]}, f)
        written[name] = data
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                     "ship", "truck"]}, f)
    return written


def test_cifar10(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    written = _write_cifar(tmp_path)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: Path(path).is_file())  # fake files
    train, test = CIFAR10Dataset(tmp_path), CIFAR10Dataset(tmp_path, train=False)
    assert len(train) == 10 and len(test) == 2
    image, label = test[1]
    want = torch.from_numpy(written["test_batch"][1]).view(3, 32, 32).float() / 255
    assert image.shape == (3, 32, 32) and torch.equal(image, want)
    assert label.dtype == torch.int64 and int(label) == 7 and test.classes[7] == "horse"
    assert torch.equal(train[2][0], torch.from_numpy(written["data_batch_2"][0]).view(3, 32, 32).float() / 255)
    assert train.info.image_size == (32, 32) and train.info.task == "classification"


@pytest.fixture
def coco(tmp_path):
    mask_util = pytest.importorskip("pycocotools.mask")
    h, w = 20, 30
    _png(tmp_path / "images" / "one.png", _pixels(5, h, w))
    _png(tmp_path / "images" / "two.png", _pixels(6, 10, 10))
    obj = np.zeros((h, w), dtype=np.uint8)
    obj[3:9, 4:14] = 1
    rle = mask_util.encode(np.asfortranarray(obj))
    rle["counts"] = rle["counts"].decode()
    anns = [
        {"id": 1, "image_id": 7, "category_id": 3, "bbox": [4, 3, 10, 6], "area": 60, "iscrowd": 0,
         "segmentation": rle},
        {"id": 2, "image_id": 7, "category_id": 9, "bbox": [20, 10, 15, 5], "area": 75, "iscrowd": 0,  # clipped
         "segmentation": [[20, 10, 30, 10, 30, 15, 20, 15]]},
        {"id": 3, "image_id": 7, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 1,  # crowd
         "segmentation": rle},
        {"id": 4, "image_id": 7, "category_id": 1, "bbox": [5, 5, 0, 4], "area": 0, "iscrowd": 0,  # no width
         "segmentation": [[5, 5, 5, 9, 5, 9]]},
    ]
    spec = {"images": [{"id": 7, "file_name": "one.png", "height": h, "width": w},
                       {"id": 2, "file_name": "two.png", "height": 10, "width": 10}],
            "categories": [{"id": 9, "name": "zebra"}, {"id": 1, "name": "ant"}, {"id": 3, "name": "cat"}],
            "annotations": anns}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(spec))
    return tmp_path / "images", path, obj


def test_coco_detection(coco):
    image_dir, annotations, obj = coco
    ds = COCODetectionDataset(image_dir, annotations)
    assert ds.classes == ("ant", "cat", "zebra")  # sorted category ids 1, 3, 9 -> labels 0, 1, 2
    assert len(ds) == 2 and ds.dataset.ids == [2, 7]
    image, t = ds[1]
    assert torch.equal(image, read_rgb(image_dir / "one.png")) and image.shape == (3, 20, 30)
    # xywh -> xyxy; the second box clipped to the 30-pixel width; crowd and zero-width boxes dropped
    assert torch.equal(t["boxes"], torch.tensor([[4.0, 3.0, 14.0, 9.0], [20.0, 10.0, 30.0, 15.0]]))
    assert t["labels"].tolist() == [1, 2] and t["labels"].dtype == torch.int64 and int(t["image_id"]) == 7
    assert "masks" not in t
    _, empty = ds[0]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    images, targets = detection_collate([ds[0], ds[1]])
    assert isinstance(images, list) and len(targets) == 2  # sizes differ: a list


def test_coco_masks(coco):
    image_dir, annotations, obj = coco
    ds = COCODetectionDataset(image_dir, annotations, masks=True)
    _, t = ds[1]
    assert t["masks"].shape == (2, 20, 30) and t["masks"].dtype == torch.bool
    assert torch.equal(t["masks"][0], torch.from_numpy(obj).bool())  # the RLE decodes to the mask written
    ys, xs = t["masks"][1].nonzero(as_tuple=True)  # the polygon rectangle: rows 10..14, columns 20..29
    assert int(ys.min()) == 10 and int(ys.max()) in (14, 15) and int(xs.min()) == 20 and int(xs.max()) == 29
    assert ds[0][1]["masks"].shape == (0, 10, 10)
    assert ds.info.target_fields == ("boxes", "labels", "image_id", "masks")


def test_transforms_see_each_pair(tmp_path):
    _png(tmp_path / "a" / "x.png", _pixels(7, 4, 4))
    ds = ImageFolderDataset(tmp_path, transforms=lambda image, label: (image.flip(-1), label + 10))
    image, label = ds[0]
    assert int(label) == 10 and torch.equal(image, read_rgb(tmp_path / "a" / "x.png").flip(-1))
