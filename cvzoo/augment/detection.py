"""Detection Mosaic and MixUp: several images and their targets combined into one.

Written here rather than taken from kornia: kornia's RandomMosaic moves boxes only (no masks, keypoints or labels)
and zeroes lost boxes instead of dropping the object with its fields. Box/keypoint conventions as in
`cvzoo.augment._targets` (boxes continuous xyxy, keypoints pixel-index).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from cvzoo.augment._targets import (
    DEFAULT_IMAGE_FIELDS,
    PaddedTargets,
    box_area,
    check_images,
    check_size,
    check_unit_interval,
    clip_boxes,
    keep_boxes,
    masks_to_boxes,
    pad_targets,
    unpad_targets,
)
from cvzoo.augment.mix import sample_beta


def mosaic(
    images: Tensor,
    targets: Sequence[dict[str, Any]],
    *,
    sources: Tensor,
    centers: Tensor,
    output_size: tuple[int, int],
    fill: float = 0.5,
    min_visibility: float = 0.3,
    min_box_size: float = 1.0,
    image_fields: Sequence[str] = DEFAULT_IMAGE_FIELDS,
) -> tuple[Tensor, list[dict[str, Any]]]:
    """Four images of the batch tiled around a centre: (B, C, H, W) -> (B, C, Ho, Wo), B target dicts.

    Output image b is split at ``centers[b] = (cx, cy)`` (integer output pixels) into quadrants q = 0..3
    (top-left, top-right, bottom-left, bottom-right). Quadrant q shows image ``sources[b, q]`` placed with its
    corner at the centre: its pixel (x, y) lands at (x + ox, y + oy) with ``ox = cx - W`` for the left quadrants,
    ``cx`` for the right ones, ``oy = cy - H`` for the top quadrants and ``cy`` for the bottom ones. Uncovered
    pixels get `fill`. Boxes/keypoints are shifted by (ox, oy) and clipped to their quadrant; an object whose
    visible fraction (clipped box area / box area, or visible mask pixels / mask pixels with masks, where the box
    becomes the visible mask's tight box) is below `min_visibility`, or whose box side is below `min_box_size`,
    is dropped with all its fields; keypoints outside the quadrant get visibility 0. Image-level entries of output b
    come from ``targets[b]``.

    Args:
        sources: (B, 4) int64 batch indices of the images in the four quadrants.
        centers: (B, 2) int64 (cx, cy) with 0 <= cx <= Wo, 0 <= cy <= Ho.
    """
    check_images(images)
    b, c, h, w = images.shape
    ho, wo = output_size
    dev = images.device
    if sources.shape != (b, 4):
        raise ValueError(f"sources must be (B, 4) = {(b, 4)} batch indices, got {tuple(sources.shape)}")
    if centers.shape != (b, 2):
        raise ValueError(f"centers must be (B, 2) = {(b, 2)} (cx, cy), got {tuple(centers.shape)}")
    padded = pad_targets(targets, images, image_fields)
    sources, centers = sources.to(dev).long(), centers.to(dev).long()
    cx, cy = centers[:, :1], centers[:, 1:]  # (B, 1)
    xs = torch.arange(wo, device=dev)
    ys = torch.arange(ho, device=dev)

    # image pixels: each output pixel reads (source, sy, sx) of the quadrant it lies in
    right = xs >= cx  # (B, Wo)
    bottom = ys >= cy  # (B, Ho)
    sx = xs - torch.where(right, cx, cx - w)  # (B, Wo) source column
    sy = ys - torch.where(bottom, cy, cy - h)  # (B, Ho)
    quadrant = bottom[:, :, None].long() * 2 + right[:, None, :].long()  # (B, Ho, Wo)
    src = sources.gather(1, quadrant.flatten(1)).view(b, ho, wo)  # (B, Ho, Wo)
    inside = ((sy >= 0) & (sy < h))[:, :, None] & ((sx >= 0) & (sx < w))[:, None, :]  # (B, Ho, Wo)
    pixels = images.permute(0, 2, 3, 1)[src, sy.clamp(0, h - 1)[:, :, None], sx.clamp(0, w - 1)[:, None, :]]
    out = torch.where(inside[..., None], pixels, torch.full_like(pixels, fill)).permute(0, 3, 1, 2)  # (B, C, Ho, Wo)

    # targets: the four quadrants' objects, each shifted and clipped to its quadrant, then concatenated
    quads: list[dict[str, Tensor]] = []
    valids, keeps = [], []
    for q in range(4):  # static loop over quadrants
        is_right, is_bottom = q % 2 == 1, q >= 2
        ox = cx if is_right else cx - w  # (B, 1)
        oy = cy if is_bottom else cy - h
        x_lo, x_hi = (cx, torch.full_like(cx, wo)) if is_right else (torch.zeros_like(cx), cx)
        y_lo, y_hi = (cy, torch.full_like(cy, ho)) if is_bottom else (torch.zeros_like(cy), cy)
        s = sources[:, q]
        fields = {k: v[s] for k, v in padded.fields.items()}  # (B, M, ...)
        shift = torch.cat([ox, oy, ox, oy], 1)[:, None].float()  # (B, 1, 4)
        moved = fields["boxes"] + shift
        if "masks" in fields:
            m = fields["masks"]  # (B, M, H, W)
            region = (
                ((ys >= y_lo) & (ys < y_hi) & (ys - oy >= 0) & (ys - oy < h))[:, :, None]
                & ((xs >= x_lo) & (xs < x_hi) & (xs - ox >= 0) & (xs - ox < w))[:, None, :]
            )  # (B, Ho, Wo)
            rows = (ys - oy).clamp(0, h - 1)[:, None, :, None].expand(-1, m.shape[1], -1, w)  # (B, M, Ho, W)
            cols = (xs - ox).clamp(0, w - 1)[:, None, None, :].expand(-1, m.shape[1], ho, -1)  # (B, M, Ho, Wo)
            placed = m.gather(2, rows).gather(3, cols) & region[:, None]  # (B, M, Ho, Wo)
            fields["masks"] = placed
            boxes = masks_to_boxes(placed)
            visibility = placed.flatten(2).sum(-1).float() / m.flatten(2).sum(-1).float().clamp(min=1)
        else:
            boxes = clip_boxes(moved, x_lo, y_lo, x_hi, y_hi)
            visibility = box_area(boxes) / box_area(moved).clamp(min=1e-6)
        fields["boxes"] = boxes
        if "keypoints" in fields:
            kp = fields["keypoints"]  # (B, M, K, 3)
            x = kp[..., 0] + ox[:, :, None]
            y = kp[..., 1] + oy[:, :, None]
            lo_x, hi_x, lo_y, hi_y = (t[:, :, None] - 0.5 for t in (x_lo, x_hi, y_lo, y_hi))  # pixel-index span
            ok = (x >= lo_x) & (x <= hi_x) & (y >= lo_y) & (y <= hi_y)
            fields["keypoints"] = torch.stack([x, y, torch.where(ok, kp[..., 2], torch.zeros_like(kp[..., 2]))], -1)
        quads.append(fields)
        valids.append(padded.valid[s])
        keeps.append(keep_boxes(boxes, visibility, min_visibility, min_box_size))
    merged = {k: torch.cat([f[k] for f in quads], 1) for k in padded.fields}  # (B, 4M, ...)
    result = PaddedTargets(merged, torch.cat(valids, 1), padded.image_level, padded.key_order)
    return out, unpad_targets(result, torch.cat(keeps, 1))


class Mosaic(nn.Module):
    """Mosaic (YOLOv4): four images of the batch tiled into each output around a random centre.

    (B, C, H, W), B target dicts -> (B, C, *output_size), B target dicts (see `mosaic` for the geometry).
    Output b always contains image b in a random quadrant; the other three quadrants show random images of the
    batch. The centre is uniform in `center_range` times the output size. Resize or crop afterwards (e.g. with
    `DetectionAugment`) for scale jitter.

    Args:
        output_size: (Ho, Wo) of the mosaic (an int means square); 2 * input size shows all four images whole when
            the centre is in the middle.
        center_range: (lo, hi) fractions of the output size within which the centre is drawn.
        fill: value of pixels no image covers.
        min_visibility: in [0, 1]; smallest visible fraction of an object that is kept.
        min_box_size: smallest kept box side in output pixels.
        image_fields: target keys that are never per-object.
    """

    def __init__(
        self,
        output_size: int | tuple[int, int],
        *,
        center_range: tuple[float, float] = (0.25, 0.75),
        fill: float = 0.5,
        min_visibility: float = 0.3,
        min_box_size: float = 1.0,
        image_fields: Sequence[str] = DEFAULT_IMAGE_FIELDS,
    ) -> None:
        super().__init__()
        self.output_size = check_size("output_size", output_size)
        if not (len(center_range) == 2 and 0 <= center_range[0] <= center_range[1] <= 1):
            raise ValueError(f"center_range must be (lo, hi) with 0 <= lo <= hi <= 1, got {center_range!r}")
        check_unit_interval("min_visibility", min_visibility)
        if min_box_size < 0:
            raise ValueError(f"min_box_size must be >= 0, got {min_box_size!r}")
        self.center_range = (float(center_range[0]), float(center_range[1]))
        self.fill, self.min_visibility, self.min_box_size = float(fill), float(min_visibility), float(min_box_size)
        self.image_fields = tuple(image_fields)

    def forward(self, images: Tensor, targets: Sequence[dict[str, Any]]) -> tuple[Tensor, list[dict[str, Any]]]:
        """(B, C, H, W), [dict] * B -> (B, C, *output_size), [dict] * B."""
        check_images(images)
        b, dev = images.shape[0], images.device
        sources = torch.randint(0, b, (b, 4), device=dev)
        own = torch.randint(0, 4, (b,), device=dev)
        sources.scatter_(1, own[:, None], torch.arange(b, device=dev)[:, None])  # image b in a random quadrant
        lo, hi = self.center_range
        size = torch.tensor(self.output_size[::-1], device=dev)  # (Wo, Ho)
        centers = ((lo + (hi - lo) * torch.rand(b, 2, device=dev)) * size).round().long()  # (B, 2) (cx, cy)
        return mosaic(
            images,
            targets,
            sources=sources,
            centers=centers,
            output_size=self.output_size,
            fill=self.fill,
            min_visibility=self.min_visibility,
            min_box_size=self.min_box_size,
            image_fields=self.image_fields,
        )

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, center_range={self.center_range}"


class DetectionMixUp(nn.Module):
    """Detection MixUp (Zhang et al. 2019, "Bag of Freebies"): image i blended with image i - 1, objects of both.

    (B, C, H, W), B target dicts -> (B, C, H, W), B target dicts. Per image lam ~ Beta(alpha, alpha);
    x = lam * x_i + (1 - lam) * x_{i-1}. The targets of image i become its own objects followed by those of
    image i - 1, with a per-object ``weight`` field (an existing ``weight`` is multiplied): lam for its own objects,
    1 - lam for the pasted ones (a loss may weight by it). An image left unmixed (probability 1 - p) keeps only its
    own objects, weight 1. Masks (same image size) and every per-object field are concatenated alike.
    """

    def __init__(
        self,
        alpha: float = 1.5,
        *,
        p: float = 1.0,
        image_fields: Sequence[str] = DEFAULT_IMAGE_FIELDS,
    ) -> None:
        super().__init__()
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha!r}")
        check_unit_interval("p", p)
        self.alpha, self.p = float(alpha), float(p)
        self.image_fields = tuple(image_fields)

    def forward(self, images: Tensor, targets: Sequence[dict[str, Any]]) -> tuple[Tensor, list[dict[str, Any]]]:
        """(B, C, H, W), [dict] * B -> (B, C, H, W), [dict] * B."""
        check_images(images)
        b, dev = images.shape[0], images.device
        padded = pad_targets(targets, images, self.image_fields)
        lam = sample_beta(self.alpha, b, dev)
        mixed = torch.rand(b, device=dev) < self.p  # (B,)
        lam = torch.where(mixed, lam, torch.ones_like(lam))
        lam_img = lam.to(images.dtype)[:, None, None, None]
        out = lam_img * images + (1 - lam_img) * images.roll(1, 0)

        fields = dict(padded.fields)
        m = fields["boxes"].shape[1]
        weight = fields.get("weight", fields["boxes"].new_ones(b, m)).float()
        fields["weight"] = weight
        merged = {k: torch.cat([v, v.roll(1, 0)], 1) for k, v in fields.items()}  # (B, 2M, ...)
        merged["weight"] = merged["weight"] * torch.cat([lam[:, None].expand(b, m), (1 - lam)[:, None].expand(b, m)], 1)
        valid = torch.cat([padded.valid, padded.valid.roll(1, 0) & mixed[:, None]], 1)  # (B, 2M)
        result = PaddedTargets(merged, valid, padded.image_level, padded.key_order)
        return out, unpad_targets(result, valid)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, p={self.p}"
