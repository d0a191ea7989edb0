"""Sanity checks for saliency maps.

Two checks:
- the cascading model-parameter randomisation test of Adebayo et al. (2018), "Sanity Checks for
  Saliency Maps";
- the pointing game (Zhang et al. 2016), where the map's peak must fall inside the object's box.

A map that survives the randomisation of the weights it claims to explain is an edge detector, not an
explanation. A map whose peak misses the object explains little about where the evidence is.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

CamFn = Callable[[nn.Module, Tensor], Tensor]  # (model, images (B, C, H, W)) -> maps (B, H, W)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of matching rows: (B, N), (B, N) -> (B,). Ties get their order's rank
    (maps are continuous, so ties are rare)."""
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"a and b must be (B, N) of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")

    def ranks(x: Tensor) -> Tensor:
        r = torch.empty_like(x, dtype=torch.float64)
        r.scatter_(1, x.argsort(dim=1), torch.arange(x.shape[1], dtype=torch.float64).expand_as(x).contiguous())
        return r - r.mean(dim=1, keepdim=True)

    ra, rb = ranks(a), ranks(b)
    return (ra * rb).sum(1) / (ra.square().sum(1).sqrt() * rb.square().sum(1).sqrt()).clamp(min=1e-12)


def _reinitialise(module: nn.Module, generator: torch.Generator) -> None:
    """New random weights for every parameter of `module`: normal with each tensor's own std (or 0.02)."""
    with torch.no_grad():
        for p in module.parameters(recurse=True):
            std = float(p.std()) if p.numel() > 1 and float(p.std()) > 0 else 0.02
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) * std)


def cascading_randomization(model: nn.Module, cam_fn: CamFn, images: Tensor, layers: Sequence[str],
                            seed: int = 0) -> list[tuple[str, float]]:
    """Adebayo et al.'s cascading randomisation: re-initialise `layers` one after another, from the top of
    the network down (pass them output-side first). After each one, compare the map with the trained
    model's map.

    Returns [(layer, mean Spearman rank correlation over the images)], one per step. A sound method's
    correlation falls as more of the network is randomised. The model itself is not touched: the
    randomisation happens on a copy.
    """
    if not layers:
        raise ValueError("layers must name at least one module to randomise")
    names = dict(model.named_modules())
    missing = [name for name in layers if name not in names]
    if missing:
        raise ValueError(f"layers {missing} are not modules of the model")
    reference = cam_fn(model, images).flatten(1)
    randomized = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    out = []
    for name in layers:
        _reinitialise(randomized.get_submodule(name), generator)
        maps = cam_fn(randomized, images).flatten(1)
        out.append((name, float(spearman(reference, maps).mean())))
    return out


def pointing_game(maps: Tensor, boxes: Sequence[Tensor], tolerance: float = 0.0) -> Tensor:
    """Per image, whether the map's maximum lies inside one of its boxes.

    Arguments: maps (B, H, W), and boxes as B tensors (N_i, 4) of xyxy input pixels. The box is grown
    by `tolerance` pixels on each side (the pointing game commonly uses 15 px). Pixel (y, x) is the
    point (x + 0.5, y + 0.5). Returns (B,) bool.
    """
    if maps.ndim != 3:
        raise ValueError(f"maps must be (B, H, W), got shape {tuple(maps.shape)}")
    if len(boxes) != maps.shape[0]:
        raise ValueError(f"boxes must hold one (N, 4) tensor per map: got {len(boxes)} for {maps.shape[0]} maps")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    b, h, w = maps.shape
    flat = maps.reshape(b, -1).argmax(dim=1)
    ys, xs = (flat // w).float() + 0.5, (flat % w).float() + 0.5
    hits = []
    for x, y, bx in zip(xs.tolist(), ys.tolist(), boxes):  # B small lists of boxes: one test each
        bx = bx.reshape(-1, 4).float()
        inside = ((bx[:, 0] - tolerance <= x) & (x <= bx[:, 2] + tolerance)
                  & (bx[:, 1] - tolerance <= y) & (y <= bx[:, 3] + tolerance))
        hits.append(bool(inside.any()))
    return torch.tensor(hits)
