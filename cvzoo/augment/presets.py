"""Named augmentation presets ("light", "medium", "heavy") for classification and detection, on kornia.

Every preset ends at a fixed `size`, so a dataset's raw size (anything) and the size after the transforms
(`output_size`) are both explicit; inputs of any size are accepted.

| preset | classification                                         | detection                                          |
|--------|--------------------------------------------------------|----------------------------------------------------|
| light  | crop scale (0.35, 1), flip, jitter 0.2                 | resize, flip, affine: scale 0.9-1.1, shift 5%      |
| medium | crop scale (0.2, 1), flip, rotate 15 deg, jitter 0.4   | crop scale (0.3, 1), flip, rotate 10 deg, jitter   |
| heavy  | crop scale (0.08, 1), flip, affine 30 deg + shear,     | crop scale (0.1, 1), flip, affine 30 deg, scale    |
|        | jitter 0.4 + hue, grayscale, cutout (random erasing)   | 0.75-1.25, jitter 0.4 + hue, grayscale             |
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from cvzoo.augment._kornia import kornia_augmentation
from cvzoo.augment._targets import DEFAULT_IMAGE_FIELDS, check_images, check_size
from cvzoo.augment.geometry import DetectionTransform

PRESETS = ("light", "medium", "heavy")


def _check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")


def classification_transforms(preset: str, size: tuple[int, int], hflip: bool = True) -> list[nn.Module]:
    """The kornia modules of a classification preset; the last geometric step outputs `size` (H, W)."""
    _check_preset(preset)
    ka = kornia_augmentation()
    # align_corners=False: the half-pixel grid, on which kornia's matrix equals the continuous-coordinate map
    crop_scale = {"light": (0.35, 1.0), "medium": (0.2, 1.0), "heavy": (0.08, 1.0)}[preset]
    ops: list[nn.Module] = [ka.RandomResizedCrop(size, scale=crop_scale, align_corners=False)]
    if hflip:
        ops.append(ka.RandomHorizontalFlip(p=0.5))
    if preset == "light":
        ops.append(ka.ColorJitter(0.2, 0.2, 0.2, 0.0, p=0.8))
    elif preset == "medium":
        ops += [ka.RandomRotation(15.0, p=0.5), ka.ColorJitter(0.4, 0.4, 0.4, 0.0, p=0.8)]
    else:
        ops += [
            ka.RandomAffine(30.0, translate=(0.1, 0.1), shear=10.0, p=0.7),
            ka.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
            ka.RandomGrayscale(p=0.2),
            ka.RandomErasing(scale=(0.02, 0.25), ratio=(0.3, 3.3), value=0.0, p=0.5),
        ]
    return ops


def detection_transforms(preset: str, size: tuple[int, int], hflip: bool = True) -> list[nn.Module]:
    """The kornia modules of a detection preset (geometric ones rigid, so boxes can follow); output `size`."""
    _check_preset(preset)
    ka = kornia_augmentation()
    ops: list[nn.Module] = []
    if preset == "light":
        ops.append(ka.Resize(size, align_corners=False))
    else:
        crop_scale = (0.3, 1.0) if preset == "medium" else (0.1, 1.0)
        ops.append(ka.RandomResizedCrop(size, scale=crop_scale, ratio=(0.5, 2.0), align_corners=False))
    if hflip:
        ops.append(ka.RandomHorizontalFlip(p=0.5))
    if preset == "light":
        ops += [
            ka.RandomAffine(0.0, translate=(0.05, 0.05), scale=(0.9, 1.1), p=0.5),
            ka.ColorJitter(0.2, 0.2, 0.2, 0.0, p=0.5),
        ]
    elif preset == "medium":
        ops += [ka.RandomRotation(10.0, p=0.5), ka.ColorJitter(0.3, 0.3, 0.3, 0.0, p=0.8)]
    else:
        ops += [
            ka.RandomAffine(30.0, translate=(0.1, 0.1), scale=(0.75, 1.25), p=0.7),
            ka.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
            ka.RandomGrayscale(p=0.1),
        ]
    return ops


class ClassificationAugment(nn.Module):
    """Preset classification augmentation: (B, C, H, W) in [0, 1] -> (B, C, *size); labels pass through.

    Args:
        preset: "light", "medium" or "heavy" (see the module table).
        size: (H, W) of the output (an int means square); any input size is accepted.
        hflip: include the random horizontal flip (turn off for digits, text, ...).
    """

    def __init__(self, preset: str = "medium", *, size: int | tuple[int, int], hflip: bool = True) -> None:
        super().__init__()
        _check_preset(preset)
        self.preset = preset
        self.output_size = check_size("size", size)
        ka = kornia_augmentation()
        self.pipeline = ka.AugmentationSequential(
            *classification_transforms(preset, self.output_size, hflip), data_keys=["input"]
        )

    def forward(self, images: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(B, C, H, W), labels (B,) or (B, K) -> (B, C, *output_size), the same labels."""
        check_images(images)
        if labels is not None and (not isinstance(labels, Tensor) or labels.shape[:1] != images.shape[:1]):
            raise ValueError(f"labels must be (B,) or (B, K) with B={images.shape[0]}, got {labels!r:.60}")
        return self.pipeline(images), labels

    def extra_repr(self) -> str:
        return f"preset={self.preset!r}, output_size={self.output_size}"


class DetectionAugment(DetectionTransform):
    """Preset detection augmentation: (B, C, H, W), targets -> (B, C, *size), targets (see DetectionTransform).

    Boxes follow the image as the tight box of their transformed corners (of the transformed mask when the
    targets carry masks), clipped; objects less than `min_visibility` visible are dropped with all their fields.

    Args:
        preset: "light", "medium" or "heavy" (see the module table).
        size: (H, W) of the output (an int means square); any input size is accepted.
        min_visibility: in [0, 1]; smallest visible fraction of an object that is kept.
        min_box_size: smallest kept box side in output pixels.
        hflip: include the random horizontal flip.
        keypoint_flip_index: permutation of the K keypoints applied to mirrored images (left/right swap).
        image_fields: target keys that are never per-object.
    """

    def __init__(
        self,
        preset: str = "medium",
        *,
        size: int | tuple[int, int],
        min_visibility: float = 0.3,
        min_box_size: float = 1.0,
        hflip: bool = True,
        keypoint_flip_index: Sequence[int] | None = None,
        image_fields: Sequence[str] = DEFAULT_IMAGE_FIELDS,
    ) -> None:
        _check_preset(preset)
        size = check_size("size", size)
        super().__init__(
            detection_transforms(preset, size, hflip),
            output_size=size,
            min_visibility=min_visibility,
            min_box_size=min_box_size,
            keypoint_flip_index=keypoint_flip_index,
            image_fields=image_fields,
        )
        self.preset = preset

    def forward(self, images: Tensor, targets: Sequence[dict[str, Any]]) -> tuple[Tensor, list[dict[str, Any]]]:
        """(B, C, H, W), [dict] * B -> (B, C, *output_size), [dict] * B."""
        return super().forward(images, targets)

    def extra_repr(self) -> str:
        return f"preset={self.preset!r}, " + super().extra_repr()
