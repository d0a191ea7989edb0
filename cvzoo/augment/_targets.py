"""Detection targets as one padded batch, and the box/mask/keypoint geometry shared by the detection augmentations.

Conventions used throughout `cvzoo.augment`:

- boxes are absolute xyxy in *continuous* pixel coordinates (torchvision's): pixel column ``i`` covers
  ``[i, i + 1)``, the image spans ``[0, W] x [0, H]``. A horizontal flip maps ``x1, x2 -> W - x2, W - x1``.
- keypoints are ``(x, y, visibility)`` in *pixel-index* coordinates (kornia's and COCO's): the centre of pixel
  column ``i`` is at ``x = i``, the image spans ``[-0.5, W - 0.5] x [-0.5, H - 0.5]``. A horizontal flip maps
  ``x -> W - 1 - x``. A keypoint is inside the image iff it lies in that span.
- kornia's ``transform_matrix`` maps pixel-index coordinates of the input to those of the output, so boxes are
  shifted by half a pixel around it (`transform_boxes`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

# keys of a target dict that always describe objects, whatever their shape
OBJECT_KEYS = ("boxes", "labels", "masks", "keypoints")
# keys that describe the image even when their leading size happens to equal the number of objects
DEFAULT_IMAGE_FIELDS = ("image_id", "orig_size", "size")


@dataclass
class PaddedTargets:
    """A list of target dicts as one padded batch.

    fields: per-object tensors padded to ``(B, M, ...)`` (``boxes (B, M, 4)`` float, ``labels (B, M)``, optional
        ``masks (B, M, H, W)`` bool, ``keypoints (B, M, K, 3)``, any extra per-object field).
    valid: ``(B, M)`` bool, False at padding.
    image_level: per image, the entries that are not per-object (copied through unchanged).
    key_order: per image, the original key order (so outputs list keys as the inputs did).
    """

    fields: dict[str, Tensor]
    valid: Tensor
    image_level: list[dict[str, Any]]
    key_order: list[list[str]]


def check_images(images: Tensor, name: str = "images") -> None:
    """Raises ValueError unless `images` is a floating (B, C, H, W) tensor."""
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        got = f"{tuple(images.shape)} {images.dtype}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a float tensor (B, C, H, W) in [0, 1], got {got}")


def check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def check_size(name: str, size: int | Sequence[int]) -> tuple[int, int]:
    """`size` as (H, W) of positive ints; an int means a square."""
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (
        not isinstance(size, Sequence)
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        raise ValueError(f"{name} must be a positive int or a pair (H, W) of positive ints, got {size!r}")
    return int(size[0]), int(size[1])


def _object_keys(target: dict[str, Any], n: int, image_fields: Sequence[str]) -> list[str]:
    return [
        k
        for k, v in target.items()
        if k in OBJECT_KEYS or (k not in image_fields and isinstance(v, Tensor) and v.ndim >= 1 and v.shape[0] == n)
    ]


def pad_targets(
    targets: Sequence[dict[str, Any]],
    images: Tensor,
    image_fields: Sequence[str] = DEFAULT_IMAGE_FIELDS,
    name: str = "targets",
) -> PaddedTargets:
    """Validates a torchvision-style target list for `images` (B, C, H, W) and pads it to (B, M, ...).

    An entry is per-object when its key is boxes/labels/masks/keypoints, or it is a tensor whose leading size is
    the number of boxes and its key is not in `image_fields`. Everything moves to the images' device.
    """
    b, _, h, w = images.shape
    if not isinstance(targets, Sequence) or len(targets) != b:
        got = len(targets) if isinstance(targets, Sequence) else type(targets).__name__
        raise ValueError(f"{name} must be a list of {b} dicts (one per image), got {got}")
    per_image: list[dict[str, Tensor]] = []
    image_level: list[dict[str, Any]] = []
    object_keys: list[str] | None = None
    for i, t in enumerate(targets):
        if not isinstance(t, dict) or "boxes" not in t or "labels" not in t:
            raise ValueError(f"{name}[{i}] must be a dict with 'boxes' (N, 4) and 'labels' (N,), got {t!r:.80}")
        boxes = t["boxes"]
        if not isinstance(boxes, Tensor) or boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"{name}[{i}]['boxes'] must be a tensor (N, 4) xyxy, got {_shape(boxes)}")
        n = boxes.shape[0]
        keys = _object_keys(t, n, image_fields)
        for k in keys:
            v = t[k]
            if not isinstance(v, Tensor) or v.ndim < 1 or v.shape[0] != n:
                raise ValueError(f"{name}[{i}][{k!r}] must be a tensor with leading size N={n}, got {_shape(v)}")
        if "masks" in t and tuple(t["masks"].shape) != (n, h, w):
            raise ValueError(f"{name}[{i}]['masks'] must be (N, H, W) = {(n, h, w)}, got {_shape(t['masks'])}")
        if "keypoints" in t and (t["keypoints"].ndim != 3 or t["keypoints"].shape[2] != 3):
            raise ValueError(f"{name}[{i}]['keypoints'] must be (N, K, 3) (x, y, v), got {_shape(t['keypoints'])}")
        if object_keys is None:
            object_keys = keys
        elif sorted(keys) != sorted(object_keys):
            raise ValueError(
                f"{name}[{i}] has per-object fields {sorted(keys)} but {name}[0] has {sorted(object_keys)}; "
                "every image of a batch needs the same fields"
            )
        obj = {k: t[k].to(images.device) for k in keys}
        obj["boxes"] = obj["boxes"].float()
        if "masks" in obj:
            obj["masks"] = obj["masks"].bool()
        per_image.append(obj)
        image_level.append({k: v for k, v in t.items() if k not in keys})
    fields: dict[str, Tensor] = {}
    for k in object_keys or ("boxes", "labels"):
        items = [p[k] for p in per_image]
        if len({tuple(x.shape[1:]) for x in items}) > 1:
            raise ValueError(f"{name}[*][{k!r}] must have the same trailing shape in every image of a batch")
        fields[k] = pad_sequence(items, batch_first=True)  # (B, M, ...)
    counts = torch.tensor([p["boxes"].shape[0] for p in per_image], device=images.device)
    m = fields["boxes"].shape[1]
    valid = torch.arange(m, device=images.device) < counts[:, None]  # (B, M)
    return PaddedTargets(fields, valid, image_level, [list(t.keys()) for t in targets])


def unpad_targets(padded: PaddedTargets, keep: Tensor) -> list[dict[str, Any]]:
    """(B, M, ...) fields and a (B, M) bool `keep` -> one dict per image with the kept objects, in input key order."""
    keep = keep & padded.valid
    counts = keep.sum(1).tolist()  # the one host sync: the output sizes are data-dependent by nature
    idx = keep.nonzero(as_tuple=True)
    split = {k: torch.split(v[idx], counts) for k, v in padded.fields.items()}
    out = []
    for i, image_level in enumerate(padded.image_level):
        d: dict[str, Any] = {}
        for k in padded.key_order[i]:
            d[k] = split[k][i] if k in split else image_level[k]
        for k in split:  # fields added by the augmentation (e.g. mix-up weights)
            if k not in d:
                d[k] = split[k][i]
        out.append(d)
    return out


def _shape(x: Any) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


def box_corners(boxes: Tensor) -> Tensor:
    """(..., 4) xyxy -> (..., 4, 2) corners (x1y1, x2y1, x2y2, x1y2)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([torch.stack(p, -1) for p in ((x1, y1), (x2, y1), (x2, y2), (x1, y2))], -2)


def apply_matrix(matrix: Tensor, points: Tensor) -> Tensor:
    """(B, 3, 3) homographies applied to (B, ..., 2) points -> (B, ..., 2)."""
    b = points.shape[0]
    flat = points.reshape(b, -1, 2)  # (B, P, 2)
    homo = torch.cat([flat, torch.ones_like(flat[..., :1])], -1) @ matrix.transpose(1, 2)  # (B, P, 3)
    out = homo[..., :2] / homo[..., 2:].clamp(min=1e-8)  # affine maps keep z == 1
    return out.reshape(points.shape)


def transform_boxes(boxes: Tensor, matrix: Tensor) -> Tensor:
    """Tight xyxy box of the transformed corners: (B, M, 4) continuous coords, (B, 3, 3) pixel-index map -> (B, M, 4).

    kornia's matrices act on pixel-index coordinates, so the corners are shifted by -0.5 before and +0.5 after:
    for a flip this gives exactly ``W - x``. Under rotation the tight box of the corners encloses the rotated box
    (it is larger than the object's own tight box).
    """
    corners = apply_matrix(matrix, box_corners(boxes) - 0.5) + 0.5  # (B, M, 4, 2)
    return torch.cat([corners.amin(-2), corners.amax(-2)], -1)


def clip_boxes(
    boxes: Tensor, x_lo: Tensor | float, y_lo: Tensor | float, x_hi: Tensor | float, y_hi: Tensor | float
) -> Tensor:
    """(B, M, 4) boxes clipped to per-image rectangles given as (B, 1) tensors (or floats); empty -> zero size."""
    x_lo, y_lo, x_hi, y_hi = (
        torch.as_tensor(t, dtype=boxes.dtype, device=boxes.device) for t in (x_lo, y_lo, x_hi, y_hi)
    )
    x1, y1, x2, y2 = boxes.unbind(-1)
    x1, x2 = torch.maximum(x1, x_lo), torch.minimum(x2, x_hi)
    y1, y2 = torch.maximum(y1, y_lo), torch.minimum(y2, y_hi)
    return torch.stack([x1, y1, torch.maximum(x2, x1), torch.maximum(y2, y1)], -1)


def box_area(boxes: Tensor) -> Tensor:
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def masks_to_boxes(masks: Tensor) -> Tensor:
    """(..., H, W) bool -> (..., 4) tight xyxy boxes in continuous coords (x2 = last column + 1); empty -> zeros."""
    h, w = masks.shape[-2:]
    cols, rows = masks.any(-2), masks.any(-1)  # (..., W), (..., H)
    xs = torch.arange(w, device=masks.device)
    ys = torch.arange(h, device=masks.device)
    x1 = torch.where(cols, xs, w).amin(-1)
    x2 = torch.where(cols, xs, -1).amax(-1) + 1
    y1 = torch.where(rows, ys, h).amin(-1)
    y2 = torch.where(rows, ys, -1).amax(-1) + 1
    boxes = torch.stack([x1, y1, x2, y2], -1).float()
    return torch.where(cols.any(-1, keepdim=True), boxes, torch.zeros_like(boxes))


def keep_boxes(boxes: Tensor, visibility: Tensor, min_visibility: float, min_box_size: float) -> Tensor:
    """(B, M) bool: visible fraction >= min_visibility and both sides of the (clipped) box >= min_box_size."""
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return (visibility >= min_visibility) & (w >= min_box_size) & (h >= min_box_size) & (w > 0) & (h > 0)
