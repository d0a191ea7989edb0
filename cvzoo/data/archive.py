"""Checkpointed extraction of dataset archives (.tar, .tar.gz, .tgz, .tar.bz2, .tar.xz, .zip).

An extraction is complete when its marker file is in place: `dest/.cvzoo-extracted-<archive name>.json`,
holding the archive's size and modification time. Members are first extracted into a temporary folder
inside `dest` (same filesystem), then moved into place (merged with what `dest` already holds, files
overwritten), and only then is the marker written. A second call with a matching marker does nothing;
an extraction that was interrupted (files present, no marker) is redone from scratch. Run it in one
process (rank 0 under DDP) before the others read the data: two concurrent extractions share a
temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

MARKER_PREFIX = ".cvzoo-extracted-"
_TEMP_PREFIX = ".cvzoo-extracting-"


def extraction_marker(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """The marker file that records a complete extraction of `archive` into `dest`."""
    return Path(dest) / f"{MARKER_PREFIX}{Path(archive).name}.json"


def _stamp(archive: Path) -> dict[str, object]:
    st = archive.stat()
    return {"archive": archive.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def is_extracted(archive: str | os.PathLike, dest: str | os.PathLike) -> bool:
    """True when `dest` holds a marker for this archive whose size and modification time still match."""
    marker = extraction_marker(archive, dest)
    try:
        return json.loads(marker.read_text()) == _stamp(Path(archive))
    except (OSError, ValueError):
        return False


def _check_member(name: str, link: str | None, archive: Path) -> None:
    """Raises ValueError for a member (or a link target) that would land outside the extraction folder."""
    for path, what in ((name, "member"), (link, "link target")):
        if path is None:
            continue
        p = PurePosixPath(path.replace("\\", "/"))
        if p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]):
            raise ValueError(f"archive {str(archive)!r} has {what} {path!r} that would be written outside the "
                             "destination (absolute path or '..'); refusing to extract it")


def _extract_tar(archive: Path, into: Path) -> None:
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for m in members:
            if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
                raise ValueError(f"archive {str(archive)!r} has member {m.name!r} that is not a file, folder or "
                                 "link; refusing to extract it")
            link = None
            if m.issym():  # a symlink's target is relative to the link's folder
                link = str(PurePosixPath(m.name).parent / m.linkname)
            elif m.islnk():
                link = m.linkname
            _check_member(m.name, link, archive)
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: the stdlib's own safety filter too
            tar.extractall(into, members=members, filter="data")
        else:  # pragma: no cover - older Pythons
            tar.extractall(into, members=members)


def _extract_zip(archive: Path, into: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        for name in zf.namelist():
            _check_member(name, None, archive)
        zf.extractall(into)


def _move_into(src: Path, dst: Path) -> None:
    """Moves `src` to `dst`, merging folders and overwriting files that are already there."""
    if src.is_dir() and not src.is_symlink() and dst.is_dir() and not dst.is_symlink():
        for child in src.iterdir():
            _move_into(child, dst / child.name)
        src.rmdir()
        return
    if dst.is_dir() and not dst.is_symlink():
        shutil.rmtree(dst)
    elif dst.exists() or dst.is_symlink():
        dst.unlink()
    os.replace(src, dst)


def extract_archive(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extracts `archive` into the folder `dest` (created if missing) unless already done; returns `dest`.

    Raises FileNotFoundError when the archive is missing, and ValueError for an unknown format or a member
    whose path would leave `dest` (absolute, '..', or a link pointing out).
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise FileNotFoundError(f"archive {str(archive)!r} does not exist")
    if is_extracted(archive, dest):
        return dest
    if tarfile.is_tarfile(archive):
        extract = _extract_tar
    elif zipfile.is_zipfile(archive):
        extract = _extract_zip
    else:
        raise ValueError(f"archive {str(archive)!r} is neither a tar (.tar, .tar.gz, ...) nor a zip file")
    dest.mkdir(parents=True, exist_ok=True)
    marker = extraction_marker(archive, dest)
    marker.unlink(missing_ok=True)  # a stale marker (the archive changed) must not survive a failure below
    temp = dest / f"{_TEMP_PREFIX}{archive.name}"
    if temp.exists():
        shutil.rmtree(temp)  # left by an interrupted extraction
    temp.mkdir()
    try:
        extract(archive, temp)
        for child in list(temp.iterdir()):
            _move_into(child, dest / child.name)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    partial = marker.with_name(marker.name + ".part")
    partial.write_text(json.dumps(_stamp(archive)))
    os.replace(partial, marker)  # atomic: a marker is either complete or absent
    return dest
