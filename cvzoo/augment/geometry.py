"""Box-, mask- and keypoint-aware detection augmentation on top of kornia's AugmentationSequential."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from cvzoo.augment._kornia import kornia_augmentation
from cvzoo.augment._targets import (
    DEFAULT_IMAGE_FIELDS,
    apply_matrix,
    box_area,
    check_images,
    check_size,
    check_unit_interval,
    clip_boxes,
    keep_boxes,
    masks_to_boxes,
    pad_targets,
    transform_boxes,
    unpad_targets,
)


class DetectionTransform(nn.Module):
    """kornia augmentations applied to images and, consistently, to their detection targets.

    (B, C, H, W) float images in [0, 1] and a list of B target dicts -> (B, C, H', W') images and B target dicts.

    The kornia pipeline runs once on the images (and on the masks, with nearest interpolation); its
    ``transform_matrix`` then moves the boxes and keypoints (see `cvzoo.augment._targets` for the coordinate
    conventions: boxes continuous xyxy, ``hflip: x -> W - x``; keypoints pixel-index, ``hflip: x -> W - 1 - x``).

    - Boxes without masks become the tight box of their transformed corners (under rotation this encloses the
      rotated box), clipped to the image. Visible fraction = clipped area / transformed (unclipped) area.
    - With masks, boxes are re-derived as the tight box of the transformed mask, and the visible fraction is
      transformed mask pixels / (original mask pixels * area scale of the transform); an empty mask is not visible.
    - Objects whose visible fraction is below `min_visibility`, or whose box side is below `min_box_size` pixels,
      are dropped together with their labels, masks, keypoints and every other per-object field.
    - Keypoints that land outside the image get visibility 0 (coordinates are kept). With `keypoint_flip_index`,
      the keypoints of mirrored images are reordered (left/right swap), detected from the sign of the matrix.

    Per-object fields are the tensors whose leading size is the number of boxes, except keys in `image_fields`;
    other entries pass through. Outputs are on the images' device, boxes float32. Output sizes are
    data-dependent, so this runs eagerly (it is data preparation, not part of a compiled model).

    Args:
        transforms: kornia 2D augmentations: rigid geometric ones (flip, affine, rotation, crop, resize,
            perspective) and intensity ones. Non-rigid warps (elastic, thin-plate) are refused: kornia leaves boxes
            and keypoints behind under them.
        output_size: (H', W') the transforms produce, or None when they keep the input size. Checked on every call.
        min_visibility: in [0, 1], see above.
        min_box_size: smallest kept box side in output pixels.
        keypoint_flip_index: permutation of the K keypoints applied to mirrored images, e.g. COCO's left/right swap.
        image_fields: target keys that are never per-object.
    """

    def __init__(
        self,
        transforms: Sequence[nn.Module],
        *,
        output_size: int | tuple[int, int] | None = None,
        min_visibility: float = 0.3,
        min_box_size: float = 1.0,
        keypoint_flip_index: Sequence[int] | None = None,
        image_fields: Sequence[str] = DEFAULT_IMAGE_FIELDS,
    ) -> None:
        super().__init__()
        ka = kornia_augmentation()
        from kornia.augmentation._2d.base import RigidAffineAugmentationBase2D

        check_unit_interval("min_visibility", min_visibility)
        if min_box_size < 0:
            raise ValueError(f"min_box_size must be >= 0, got {min_box_size!r}")
        allowed = (ka.GeometricAugmentationBase2D, ka.IntensityAugmentationBase2D)
        for i, t in enumerate(transforms):
            if not isinstance(t, allowed) or not isinstance(t, RigidAffineAugmentationBase2D):
                raise ValueError(
                    f"transforms[{i}] must be a kornia 2D rigid geometric or intensity augmentation, "
                    f"got {type(t).__name__}"
                )
        if keypoint_flip_index is not None and sorted(keypoint_flip_index) != list(range(len(keypoint_flip_index))):
            raise ValueError(f"keypoint_flip_index must be a permutation of 0..K-1, got {keypoint_flip_index!r}")
        self.output_size = None if output_size is None else check_size("output_size", output_size)
        self.min_visibility = float(min_visibility)
        self.min_box_size = float(min_box_size)
        self.image_fields = tuple(image_fields)
        self.keypoint_flip_index = None if keypoint_flip_index is None else tuple(keypoint_flip_index)
        self.pipeline = ka.AugmentationSequential(*transforms, data_keys=["input"])

    def forward(self, images: Tensor, targets: Sequence[dict[str, Any]]) -> tuple[Tensor, list[dict[str, Any]]]:
        """(B, C, H, W), [dict] * B -> (B, C, H', W'), [dict] * B."""
        check_images(images)
        padded = pad_targets(targets, images, self.image_fields)
        fields = padded.fields
        has_masks = "masks" in fields
        if has_masks and fields["masks"].shape[1] > 0:  # kornia cannot warp a 0-channel mask
            out, masks = self.pipeline(images, fields["masks"].to(images.dtype), data_keys=["input", "mask"])
            masks = masks > 0.5  # (B, M, H', W')
        else:
            out = self.pipeline(images)
            masks = None
        b, _, h, w = out.shape
        if self.output_size is not None and (h, w) != self.output_size:
            raise RuntimeError(f"the transforms produced size {(h, w)} but output_size is {self.output_size}")
        matrix = self.pipeline.transform_matrix
        eye = torch.eye(3, device=images.device)
        matrix = eye.expand(b, 3, 3) if matrix is None else matrix.to(images.device, torch.float32)  # (B, 3, 3)

        moved = transform_boxes(fields["boxes"], matrix)  # (B, M, 4), unclipped
        if has_masks:
            if masks is None:
                masks = fields["masks"].new_zeros((b, 0, h, w))
            boxes = masks_to_boxes(masks)
            scale = torch.linalg.det(matrix[:, :2, :2]).abs()[:, None]  # (B, 1) area scale of the affine part
            before = fields["masks"].flatten(2).sum(-1).float() * scale
            visibility = masks.flatten(2).sum(-1).float() / before.clamp(min=1e-6)
            fields["masks"] = masks
        else:
            boxes = clip_boxes(moved, 0.0, 0.0, float(w), float(h))
            visibility = box_area(boxes) / box_area(moved).clamp(min=1e-6)
        fields["boxes"] = boxes
        keep = keep_boxes(boxes, visibility, self.min_visibility, self.min_box_size)

        if "keypoints" in fields:
            fields["keypoints"] = self._move_keypoints(fields["keypoints"], matrix, h, w)
        return out, unpad_targets(padded, keep)

    def _move_keypoints(self, keypoints: Tensor, matrix: Tensor, h: int, w: int) -> Tensor:
        """(B, M, K, 3) -> (B, M, K, 3): xy mapped, visibility 0 outside [-0.5, W - 0.5] x [-0.5, H - 0.5]."""
        xy = apply_matrix(matrix, keypoints[..., :2].float())  # (B, M, K, 2)
        inside = (xy[..., 0] >= -0.5) & (xy[..., 0] <= w - 0.5) & (xy[..., 1] >= -0.5) & (xy[..., 1] <= h - 0.5)
        vis = torch.where(inside, keypoints[..., 2].float(), torch.zeros_like(xy[..., 0]))
        out = torch.cat([xy, vis[..., None]], -1).to(keypoints.dtype)
        if self.keypoint_flip_index is not None:
            if len(self.keypoint_flip_index) != out.shape[2]:
                raise ValueError(
                    f"keypoint_flip_index has {len(self.keypoint_flip_index)} entries but keypoints have "
                    f"K={out.shape[2]}"
                )
            mirrored = torch.linalg.det(matrix[:, :2, :2]) < 0  # (B,) an odd number of flips
            index = torch.tensor(self.keypoint_flip_index, device=out.device)
            out = torch.where(mirrored[:, None, None, None], out[:, :, index], out)
        return out

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, min_visibility={self.min_visibility}"
