"""The dataset table: names, tasks, builders, and errors that list what is known."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cvzoo.data import DATASETS, DatasetEntry, Shapes, create_dataset, list_datasets
from cvzoo.data.info import TASKS

REPO = Path(__file__).resolve().parents[2]


def test_the_table():
    assert set(DATASETS) == {"shapes", "shapes-classification", "shapes-regression", "shapes-multitask",
                             "shapes-segmentation", "digits", "voc", "voc-segmentation", "segmentation-folder",
                             "cifar10", "imagefolder", "coco", "coloured-digits", "shapes-captions"}
    for name, entry in DATASETS.items():
        assert isinstance(entry, DatasetEntry) and entry.name == name and entry.task in TASKS and entry.description
    assert {n for n, e in DATASETS.items() if e.needs_root} == {"voc", "voc-segmentation", "segmentation-folder",
                                                                "cifar10", "imagefolder", "coco"}
    assert list_datasets("multitask") == ["shapes-multitask"]
    assert list_datasets("detection") == ["shapes", "voc", "coco"]
    assert list_datasets() == list(DATASETS)


def test_embedded_datasets_build_and_match_their_task():
    for name in list_datasets():
        if DATASETS[name].needs_root:
            continue
        kwargs = {"num_images": 2} if name.startswith("shapes") else {}
        ds = create_dataset(name, split="test", **kwargs)
        assert ds.info.task == DATASETS[name].task, name
        image, _ = ds[0]
        assert image.dtype == torch.float32 and image.shape[0] == ds.info.in_channels
        assert tuple(image.shape[1:]) == ds.info.image_size
    shapes = create_dataset("shapes-regression", split="val", num_images=3, seed=4)
    assert isinstance(shapes, Shapes) and shapes.task == "regression" and len(shapes) == 3
    direct = Shapes("val", num_images=3, seed=4, task="regression")[2]
    assert torch.equal(shapes[2][0], direct[0]) and torch.equal(shapes[2][1], direct[1])


def test_adapters_need_a_root(tmp_path):
    with pytest.raises(ValueError, match="root"):
        create_dataset("voc")
    with pytest.raises(FileNotFoundError, match="VOC2012"):
        create_dataset("voc", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="instances_val2017.json"):
        create_dataset("coco", split="val", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="train"):
        create_dataset("imagefolder", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        create_dataset("cifar10", split="val", root=tmp_path)


def test_imagefolder_reads_root_split(tmp_path):
    from PIL import Image

    (tmp_path / "val" / "dog").mkdir(parents=True)
    Image.new("RGB", (5, 4), (255, 0, 0)).save(tmp_path / "val" / "dog" / "a.png")
    ds = create_dataset("imagefolder", split="val", root=tmp_path)
    image, label = ds[0]
    assert ds.classes == ("dog",) and int(label) == 0
    assert torch.equal(image, torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 4, 5))


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="shapes-multitask"):
        create_dataset("mnist")
    with pytest.raises(ValueError, match="task"):
        list_datasets("captioning")


def test_import_is_light():
    probe = ("import sys\nimport cvzoo.data\n"
             "print(','.join(m for m in ('sklearn', 'skimage', 'pycocotools', 'torchvision.datasets') "
             "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
