"""`cvzoo index build / search`: embed a folder of images with a model and search it by image.

The index directory holds what `NearestNeighborIndex.save` writes plus `embedder.json`, which records how the
images were embedded (the run directory or zoo model, the image size), so a search embeds its queries the same
way. Each indexed row's metadata is `{"path": <image file>}`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
EMBEDDER_FILE = "embedder.json"


def image_files(folder: str | Path) -> list[Path]:
    """The image files under `folder` (recursively, sorted); a ValueError when there are none."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} not found")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"the folder {root} holds no images (looked for {', '.join(IMAGE_SUFFIXES)})")
    return files


def load_embedder(spec: dict[str, Any]) -> nn.Module:
    """The embedding model a spec names: {"run": run directory} or {"model": zoo name, "checkpoint": optional
    weights} (random initialisation without one)."""
    from cvzoo.experiment import load_model, load_run
    from cvzoo.zoo import create_model

    if spec.get("run"):
        model, _ = load_run(spec["run"])
    elif spec.get("checkpoint"):
        model = load_model(spec["model"], spec["checkpoint"])
    else:
        torch.manual_seed(0)
        model = create_model(spec["model"])
    return model.eval()


def embed(model: nn.Module, images: Tensor) -> Tensor:
    """(B, C, H, W) images in [0, 1] -> (B, D) float32 embeddings: `model.features` when the model has it (a
    classifier's pooled features), else the model's output when it is a (B, D) tensor (a self-supervised
    method's pooled backbone features)."""
    sig = model.signature
    if images.shape[1] != sig.in_channels:  # RGB files for a grey model, or grey files for an RGB model
        images = images.mean(1, keepdim=True).expand(-1, sig.in_channels, -1, -1)
    x = sig.normalize(images)
    with torch.no_grad():
        out = model.features(x) if callable(getattr(model, "features", None)) else model(x)
    if not isinstance(out, Tensor) or out.ndim != 2:
        raise ValueError(f"{type(model).__name__} gives no (B, D) embedding: use a classifier or a self-supervised "
                         f"model (it returned {type(out).__name__})")
    return out.float()


def _batches(files: Sequence[Path], size: int, batch_size: int) -> Iterator[Tensor]:
    from cvzoo.experiment import read_image

    for i in range(0, len(files), batch_size):
        images = [F.interpolate(read_image(p)[None], size=(size, size), mode="bilinear", align_corners=False,
                                antialias=True)[0] for p in files[i:i + batch_size]]
        yield torch.stack(images).clamp(0.0, 1.0)


def embed_files(model: nn.Module, files: Sequence[Path], size: int, batch_size: int = 64) -> Tensor:
    """Image files -> (N, D) embeddings, each image resized to size x size."""
    return torch.cat([embed(model, batch) for batch in _batches(files, size, batch_size)])


def build_index(folder: str | Path, out: str | Path, spec: dict[str, Any], *, size: int = 64,
                backend: str = "torch", metric: str = "cosine", batch_size: int = 64) -> int:
    """Embeds every image under `folder` and saves the index to `out`; returns the number indexed."""
    from cvzoo.ssl.index import NearestNeighborIndex

    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an integer >= 8 (pixels), got {size!r}")
    files = image_files(folder)
    model = load_embedder(spec)
    min_size = model.signature.min_size
    if size < min_size:
        raise ValueError(f"size {size} is below the model's smallest input {min_size}; pass --size {min_size} or more")
    embeddings = embed_files(model, files, size, batch_size)
    index = NearestNeighborIndex(embeddings.shape[1], backend=backend, metric=metric)
    index.add(embeddings, metadata=[{"path": str(p)} for p in files])
    out = Path(out)
    index.save(out)
    index.close()
    (out / EMBEDDER_FILE).write_text(json.dumps({**spec, "size": size}, indent=2))
    return len(files)


def search_index(index_dir: str | Path, queries: Sequence[str | Path], k: int = 5
                 ) -> list[list[tuple[str, float]]]:
    """For each query image file, its k nearest indexed images: [(path, distance or similarity), ...]."""
    from cvzoo.ssl.index import NearestNeighborIndex

    index_dir = Path(index_dir)
    if not (index_dir / EMBEDDER_FILE).exists():
        raise ValueError(f"index must be a directory written by `cvzoo index build`, got {str(index_dir)!r} "
                         f"(no {EMBEDDER_FILE})")
    spec = json.loads((index_dir / EMBEDDER_FILE).read_text())
    model = load_embedder(spec)
    embeddings = embed_files(model, [Path(q) for q in queries], spec["size"])
    index = NearestNeighborIndex.load(index_dir)
    try:
        found = index.search(embeddings, k)
    finally:
        index.close()
    return [[(meta["path"], float(d)) for meta, d, i in zip(row_meta, row_d, row_ids) if i >= 0]
            for row_meta, row_d, row_ids in zip(found.metadata, found.distances.tolist(), found.ids.tolist())]
