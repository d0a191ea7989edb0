"""Training checkpoints: atomic writes, verified loads, last/previous retention, RNG state, safetensors export.

A checkpoint is one `torch.save` file holding a dict tagged with `"format": FORMAT` and `"version": VERSION`,
loadable with `torch.load(..., weights_only=True)` (no pickled classes: RNG states are stored as lists and
tensors). Writes go to a temporary file in the target directory, are fsync'ed and then `os.replace`d into
place, so a crash never leaves a half-written file under the final name. Loads check the zip records' CRC32
before unpickling, so a truncated or bit-flipped file raises `CheckpointError` instead of loading garbage.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import secrets
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor, nn

FORMAT = "cvzoo.train.checkpoint"
VERSION = 1
LAST = "last.pt"
PREVIOUS = "previous.pt"
_TMP_PREFIX = ".tmp-"

logger = logging.getLogger("cvzoo.train")


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, truncated, corrupted, or not a cvzoo training checkpoint."""


# ---- wrapped models ------------------------------------------------------------------------------


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside `torch.compile` (`_orig_mod`) and DDP / DataParallel (`module`) wrappers."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def strip_wrapper_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """State-dict keys of a compiled or DDP-wrapped model -> the keys of the plain model.

    Drops every `_orig_mod.` component (torch.compile, also on compiled submodules) and a leading `module.`
    shared by all keys (DDP / DataParallel; a submodule that happens to be called `module` is left alone
    unless every key starts with it)."""
    out = {".".join(part for part in k.split(".") if part != "_orig_mod"): v for k, v in state_dict.items()}
    while out and all(k.startswith("module.") for k in out):
        out = {k[len("module."):]: v for k, v in out.items()}
    return out


def load_model_state(model: nn.Module, state_dict: Mapping[str, Any], strict: bool = True):
    """`model.load_state_dict` after `strip_wrapper_prefixes`, into the plain module inside any wrapper."""
    return unwrap_model(model).load_state_dict(strip_wrapper_prefixes(state_dict), strict=strict)


# ---- atomic files --------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform/filesystem lets a directory be opened and synced
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_temp(directory: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Writes through `write` into a new temporary file in `directory`, flushed and fsync'ed; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f"{_TMP_PREFIX}{secrets.token_hex(8)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, unlike mkstemp's 0600
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return Path(tmp)


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save(obj)` to `path` atomically: temp file in the same directory, fsync, `os.replace`."""
    path = Path(path)
    tmp = _write_temp(path.parent, lambda f: torch.save(obj, f))
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def remove_stale_temp_files(directory: str | os.PathLike) -> None:
    """Deletes temporary files left by a writer that was killed mid-write."""
    for tmp in Path(directory).glob(f"{_TMP_PREFIX}*"):
        with contextlib.suppress(OSError):
            tmp.unlink()


# ---- checkpoints ---------------------------------------------------------------------------------


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Writes `state` (a dict of state dicts, ints, floats, strings, lists) atomically, tagged with the format."""
    return atomic_save({"format": FORMAT, "version": VERSION, **state}, path)


def save_rotating(state: Mapping[str, Any], directory: str | os.PathLike) -> Path:
    """Saves `directory/last.pt`, first moving the old one to `previous.pt`: the last two checkpoints are kept.

    The new file is fully written and synced before the old ones move, so at any instant at least one of
    `last.pt` / `previous.pt` is a complete checkpoint."""
    directory = Path(directory)
    tmp = _write_temp(directory, lambda f: torch.save({"format": FORMAT, "version": VERSION, **state}, f))
    last = directory / LAST
    if last.exists():
        os.replace(last, directory / PREVIOUS)
    os.replace(tmp, last)
    _fsync_dir(directory)
    return last


def _describe(obj: Any) -> str:
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            return f"a plain state_dict of {len(obj)} tensors (load weights with load_model_state)"
        keys = ", ".join(repr(k) for k in list(obj)[:5])
        return f"a dict without the {FORMAT!r} format tag (keys {keys}{', ...' if len(obj) > 5 else ''})"
    return f"a {type(obj).__name__}"


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Reads a checkpoint written by `save_checkpoint` / `save_rotating`, verifying it first.

    Raises `CheckpointError` naming the file and the reason when it is missing, truncated or corrupted
    (zip structure or CRC32 of a record), unreadable with `weights_only=True` (some other pickle), or a
    foreign file (a plain state_dict, another program's checkpoint, a newer format version)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()  # reads every record and checks its CRC32
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated or not a torch.save zip file: {err}") from err
    if bad is not None:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupted: CRC mismatch in record {bad!r}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, ... depending on the damage
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be loaded with weights_only=True "
                              f"({type(err).__name__}: {first_line})") from err
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a cvzoo training checkpoint: it holds {_describe(obj)}")
    version = obj.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has format version {version!r}; this cvzoo reads "
                              f"versions up to {VERSION}")
    if "model" not in obj:
        raise CheckpointError(f"checkpoint {str(path)!r} holds no 'model' state")
    return obj


def find_resumable(directory: str | os.PathLike,
                   map_location: str | torch.device | None = "cpu") -> tuple[Path, dict[str, Any]] | None:
    """The newest good checkpoint in `directory`: `last.pt`, else `previous.pt` with a warning; None if neither
    exists. Raises `CheckpointError` when files exist but none of them loads."""
    directory = Path(directory)
    errors = []
    for name in (LAST, PREVIOUS):
        path = directory / name
        if not path.exists():
            continue
        try:
            state = load_checkpoint(path, map_location)
        except CheckpointError as err:
            errors.append(str(err))
            logger.warning("skipping unusable checkpoint: %s", err)
            continue
        if errors or name == PREVIOUS:
            why = errors[0] if errors else f"{str(directory / LAST)!r} is missing"
            logger.warning("resuming from the previous checkpoint %s because %s", path, why)
        return path, state
    if errors:
        raise CheckpointError(f"no usable checkpoint in {str(directory)!r}: " + "; ".join(errors))
    return None


# ---- RNG state -----------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy (legacy global), torch CPU and, when CUDA is initialised, CUDA generator states,
    in a form `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of `capture_rng_state` (a missing CUDA entry leaves the CUDA generators alone)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
        else:
            logger.warning("checkpoint holds %d CUDA RNG states but %d devices are visible; not restoring them",
                           len(cuda_states), torch.cuda.device_count())


# ---- safetensors ---------------------------------------------------------------------------------


def export_safetensors(model: nn.Module, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
    """Writes the weights (parameters and persistent buffers) of `model` (plain, compiled or DDP-wrapped) to a
    safetensors file, atomically. Tied weights are stored once (`safetensors.torch.save_model`)."""
    from safetensors.torch import save_model

    path = Path(path)
    tmp = _write_temp(path.parent, lambda f: None)  # created with the umask's permissions, filled below
    try:
        save_model(unwrap_model(model), str(tmp), metadata=dict(metadata) if metadata else None)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def load_safetensors(model: nn.Module, path: str | os.PathLike, strict: bool = True,
                     device: str | torch.device = "cpu") -> nn.Module:
    """Loads weights written by `export_safetensors` into `model` (in place) and returns it.

    Raises `CheckpointError` for a missing or unreadable file; a key or shape mismatch raises torch's
    RuntimeError as `load_state_dict` does."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"safetensors file {str(path)!r} does not exist")
    try:
        load_model(unwrap_model(model), path, strict=strict, device=str(device))
    except SafetensorError as err:
        raise CheckpointError(f"safetensors file {str(path)!r} cannot be read: {err}") from err
    return model
