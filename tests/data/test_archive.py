"""extract_archive: once per archive (marker file), redone after an interruption, no path traversal."""

from __future__ import annotations

import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cvzoo.data.archive as archive_mod
from cvzoo.data.adapters import VOC_CLASSES, VOCDetectionDataset
from cvzoo.data.archive import extract_archive, extraction_marker, is_extracted

# name -> (height, width, colour, [(class, xmin, ymin, xmax, ymax, difficult)]) in VOC's 1-based inclusive pixels
VOC_IMAGES = {
    "2008_000001": (40, 60, (200, 30, 30), [("dog", 1, 1, 60, 40, 0), ("person", 10, 5, 20, 30, 1)]),
    "2008_000002": (50, 30, (20, 90, 220), [("tvmonitor", 3, 4, 12, 45, 0)]),
}


def _voc_xml(name: str, h: int, w: int, objects) -> str:
    objs = "".join(
        f"<object><name>{c}</name><pose>Left</pose><truncated>0</truncated><difficult>{d}</difficult>"
        f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        for c, x1, y1, x2, y2, d in objects)
    return (f"<annotation><folder>VOC2012</folder><filename>{name}.jpg</filename>"
            f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>{objs}</annotation>")


def _write_voc(root: Path, year: str = "2012") -> None:
    base = root / "VOCdevkit" / f"VOC{year}"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for name, (h, w, colour, objects) in VOC_IMAGES.items():
        Image.fromarray(np.full((h, w, 3), colour, dtype=np.uint8)).save(base / "JPEGImages" / f"{name}.jpg")
        (base / "Annotations" / f"{name}.xml").write_text(_voc_xml(name, h, w, objects))
    (base / "ImageSets/Main/train.txt").write_text("\n".join(VOC_IMAGES) + "\n")


def _voc_tar(tmp_path: Path, year: str = "2012", suffix: str = ".tar") -> Path:
    src = tmp_path / f"src{year}"
    _write_voc(src, year)
    path = tmp_path / f"VOCtrainval{year}{suffix}"
    with tarfile.open(path, "w:gz" if suffix.endswith("gz") else "w") as tar:
        tar.add(src / "VOCdevkit", arcname="VOCdevkit")
    return path


@pytest.fixture
def count_extractions(monkeypatch):
    calls = []
    real_tar, real_zip = archive_mod._extract_tar, archive_mod._extract_zip

    def counting(real):
        def extract(archive, into):
            calls.append(Path(archive).name)
            return real(archive, into)
        return extract

    monkeypatch.setattr(archive_mod, "_extract_tar", counting(real_tar))
    monkeypatch.setattr(archive_mod, "_extract_zip", counting(real_zip))
    return calls


def _check_voc(ds: VOCDetectionDataset) -> None:
    assert len(ds) == 2
    for i, (name, (h, w, colour, objects)) in enumerate(VOC_IMAGES.items()):
        image, target = ds[i]
        assert image.shape == (3, h, w)
        jpeg = ds.dataset.images[i]
        assert Path(jpeg).stem == name
        want_image = torch.from_numpy(np.asarray(Image.open(jpeg).convert("RGB")).copy()).permute(2, 0, 1) / 255
        assert torch.equal(image, want_image)  # as PIL decodes the file
        assert (image.mean(dim=(1, 2)) * 255 - torch.tensor(colour, dtype=torch.float32)).abs().max() < 3
        # VOC's 1-based inclusive (xmin, ymin, xmax, ymax) -> (xmin - 1, ymin - 1, xmax, ymax)
        want = torch.tensor([[x1 - 1, y1 - 1, x2, y2] for _, x1, y1, x2, y2, _ in objects], dtype=torch.float32)
        assert torch.equal(target["boxes"], want)
        assert target["labels"].tolist() == [VOC_CLASSES.index(c) for c, *_ in objects]
        assert target["labels"].dtype == torch.int64
        assert target["difficult"].tolist() == [bool(d) for *_, d in objects]


def test_voc_from_an_archive_is_extracted_once(tmp_path, count_extractions, monkeypatch):
    tar = _voc_tar(tmp_path)
    root = tmp_path / "data"
    _check_voc(VOCDetectionDataset(root, archive=tar))
    assert count_extractions == [tar.name]
    marker = extraction_marker(tar, root)
    assert json.loads(marker.read_text())["size"] == tar.stat().st_size
    assert not any(p.name.startswith(".cvzoo-extracting") for p in root.iterdir())  # temp folder gone

    def fail(*args):
        raise AssertionError("extracted again")

    monkeypatch.setattr(archive_mod, "_extract_tar", fail)
    _check_voc(VOCDetectionDataset(root, archive=tar))  # the marker matches: nothing is extracted


def test_an_interrupted_extraction_is_redone(tmp_path, count_extractions):
    tar = _voc_tar(tmp_path)
    root = tmp_path / "data"
    extract_archive(tar, root)
    # simulate a crash: marker gone, one file half written, a stale temp folder left behind
    extraction_marker(tar, root).unlink()
    xml = root / "VOCdevkit/VOC2012/Annotations/2008_000001.xml"
    xml.write_text(xml.read_text()[:50])
    stale = root / f".cvzoo-extracting-{tar.name}"
    (stale / "junk").mkdir(parents=True)
    assert not is_extracted(tar, root)
    _check_voc(VOCDetectionDataset(root, archive=tar))
    assert count_extractions == [tar.name, tar.name]
    assert is_extracted(tar, root) and not stale.exists()


def test_a_changed_archive_is_extracted_again(tmp_path, count_extractions):
    tar = _voc_tar(tmp_path)
    root = tmp_path / "data"
    extract_archive(tar, root)
    extract_archive(tar, root)
    st = tar.stat()
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert not is_extracted(tar, root)
    extract_archive(tar, root)
    assert count_extractions == [tar.name, tar.name]


def test_archives_merge_into_one_root(tmp_path):
    root = tmp_path / "data"
    a = _voc_tar(tmp_path, "2012", ".tar.gz")
    b = _voc_tar(tmp_path, "2007", ".tar")
    extract_archive(a, root)
    extract_archive(b, root)  # VOCdevkit/VOC2007 joins VOCdevkit/VOC2012 rather than replacing the folder
    assert sorted(p.name for p in (root / "VOCdevkit").iterdir()) == ["VOC2007", "VOC2012"]
    assert is_extracted(a, root) and is_extracted(b, root)
    assert len(VOCDetectionDataset(root, year="2007")) == 2


def test_zip_archives(tmp_path):
    path = tmp_path / "folder.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("flowers/rose/a.txt", "rose")
        zf.writestr("flowers/tulip/b.txt", "tulip")
    out = extract_archive(path, tmp_path / "x")
    assert (out / "flowers/rose/a.txt").read_text() == "rose"
    assert is_extracted(path, out)


def _tar_with(path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(path, "w") as tar:
        ok = tarfile.TarInfo("fine.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        member.size = len(data) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return path


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink"])
def test_members_that_escape_the_destination_are_refused(tmp_path, kind):
    member = tarfile.TarInfo({"dotdot": "a/../../evil.txt", "absolute": "/tmp/evil.txt"}.get(kind, "link"))
    if kind == "symlink":
        member.type, member.linkname = tarfile.SYMTYPE, "../../evil.txt"
    elif kind == "hardlink":
        member.type, member.linkname = tarfile.LNKTYPE, "../evil.txt"
    path = _tar_with(tmp_path / "bad.tar", member, b"evil")
    dest = tmp_path / "deep" / "dest"
    with pytest.raises(ValueError, match="outside"):
        extract_archive(path, dest)
    assert not (tmp_path / "deep" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert not (dest / "fine.txt").exists() and not is_extracted(path, dest)


def test_zip_traversal_is_refused(tmp_path):
    path = tmp_path / "bad.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("../evil.txt", "evil")
    with pytest.raises(ValueError, match="outside"):
        extract_archive(path, tmp_path / "dest")


def test_missing_or_unknown_archives(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.tar"):
        extract_archive(tmp_path / "nothing.tar", tmp_path / "dest")
    text = tmp_path / "notes.txt"
    text.write_text("not an archive")
    with pytest.raises(ValueError, match="neither a tar"):
        extract_archive(text, tmp_path / "dest")
