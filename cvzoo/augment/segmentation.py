"""Named augmentation presets for semantic segmentation, on kornia: one geometric draw moves image and mask.

| preset | geometric (image and mask)                                    | photometric (image only)           |
|--------|---------------------------------------------------------------|------------------------------------|
| light  | resize, flip, affine: scale 0.9-1.1, shift 5%                 | jitter 0.2                         |
| medium | crop scale (0.3, 1), flip, rotate 10 deg                      | jitter 0.3                         |
| heavy  | crop scale (0.1, 1), flip, affine 30 deg, scale 0.75-1.25     | jitter 0.4 + hue, grayscale        |

Masks are resampled with nearest neighbour, so every output label is an input label; pixels that come from
outside the input image (rotation corners, affine shifts) get `ignore_index`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cvzoo.augment._kornia import kornia_augmentation
from cvzoo.augment._targets import check_images, check_size
from cvzoo.augment.presets import _check_preset, detection_transforms

MASK_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def segmentation_transforms(preset: str, size: tuple[int, int], hflip: bool = True) -> list[nn.Module]:
    """The kornia modules of a segmentation preset: the detection preset's (rigid geometric steps, the first
    outputs `size` (H, W); they pad with zeros, which `SegmentationAugment` turns into `ignore_index` on masks)."""
    return detection_transforms(preset, size, hflip)


class SegmentationTransform(nn.Module):
    """kornia augmentations applied to images and, with the same parameters, to their label masks.

    (B, C, H, W) float images in [0, 1], (B, H, W) integer masks -> (B, C, H', W') images, (B, H', W') int64
    masks. Geometric steps move both (masks with nearest neighbour, so labels are never blended); intensity
    steps touch the images only. Mask pixels that come from outside the input (padding) get `ignore_index`.

    The mask travels as `label + 1` (and `ignore_index` as 0) so that kornia's zero padding is told apart from
    every label, background 0 included, and decoded to `ignore_index`.

    Args:
        transforms: kornia 2D augmentations whose geometric steps pad with zeros (`padding_mode="zeros"`, the
            default) and intensity ones.
        output_size: (H', W') the transforms produce, or None when they keep the input size. Checked on every call.
        ignore_index: the mask value of pixels to ignore, in the input and for padding in the output.
    """

    def __init__(
        self, transforms: list[nn.Module], *, output_size: int | tuple[int, int] | None = None, ignore_index: int = 255
    ) -> None:
        super().__init__()
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ValueError(f"ignore_index must be an integer, got {ignore_index!r}")
        ka = kornia_augmentation()
        self.output_size = None if output_size is None else check_size("output_size", output_size)
        self.ignore_index = ignore_index
        self.pipeline = ka.AugmentationSequential(*transforms, data_keys=["input", "mask"])

    def forward(self, images: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) float, (B, H, W) integer -> (B, C, H', W') float, (B, H', W') int64."""
        check_images(images)
        b, _, h, w = images.shape
        if not isinstance(masks, Tensor) or masks.shape != (b, h, w) or masks.dtype not in MASK_DTYPES:
            got = f"{tuple(masks.shape)} {masks.dtype}" if isinstance(masks, Tensor) else type(masks).__name__
            raise ValueError(f"masks must be an integer tensor (B, H, W) = {(b, h, w)} of class indices, got {got}")
        masks = masks.to(images.device, torch.int64)
        ignored = masks == self.ignore_index
        if bool(((masks < 0) & ~ignored).any()):  # data preparation, eager: one host sync for a clear error
            raise ValueError(
                f"masks must hold class indices >= 0 or ignore_index={self.ignore_index}, got the value "
                f"{int(masks[(masks < 0) & ~ignored][0])}"
            )
        encoded = torch.where(ignored, 0, masks + 1)[:, None]  # (B, 1, H, W); 0 is reserved for padding
        out, moved = self.pipeline(images, encoded)
        if self.output_size is not None and tuple(out.shape[-2:]) != self.output_size:
            raise RuntimeError(
                f"the transforms produced size {tuple(out.shape[-2:])} but output_size is {self.output_size}"
            )
        moved = moved.reshape(b, *out.shape[-2:]).long()  # (B, H', W')
        return out, torch.where(moved == 0, self.ignore_index, moved - 1)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, ignore_index={self.ignore_index}"


class SegmentationAugment(SegmentationTransform):
    """Preset segmentation augmentation: (B, C, H, W), (B, H, W) -> (B, C, *size), (B, *size) int64.

    The same geometric draw moves each image and its mask (nearest neighbour for the mask); photometric
    steps change the image only; mask pixels from outside the input image get `ignore_index`.

    Args:
        preset: "light", "medium" or "heavy" (see the module table).
        size: (H, W) of the output (an int means square); any input size is accepted.
        ignore_index: the mask value of pixels to ignore (kept as is) and of padded pixels.
        hflip: include the random horizontal flip.
    """

    def __init__(
        self, preset: str = "medium", *, size: int | tuple[int, int], ignore_index: int = 255, hflip: bool = True
    ) -> None:
        _check_preset(preset)
        size = check_size("size", size)
        super().__init__(segmentation_transforms(preset, size, hflip), output_size=size, ignore_index=ignore_index)
        self.preset = preset

    def extra_repr(self) -> str:
        return f"preset={self.preset!r}, " + super().extra_repr()
