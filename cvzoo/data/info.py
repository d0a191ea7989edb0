"""What a dataset yields, written down once: its task, classes, channels and raw image size."""

from __future__ import annotations

import dataclasses

TASKS = ("detection", "classification", "regression", "multitask", "segmentation", "debiasing", "captions")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """The signature of a dataset, apart from how it is built.

    `image_size` is the raw `(H, W)` of every image, or None when sizes vary. `target_fields` names what
    a sample's target holds: the keys of a detection target dict, or the single field of a
    classification (`("label",)`) or regression (`("value",)`) target. `keypoint_flip` is the keypoint
    order after a horizontal flip (left and right points swap: index i takes keypoint `keypoint_flip[i]`),
    None when the dataset has no keypoints or does not say.
    """

    name: str
    task: str
    classes: tuple[str, ...]
    in_channels: int
    image_size: tuple[int, int] | None
    target_fields: tuple[str, ...]
    keypoint_flip: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")
        if self.image_size is not None and (len(self.image_size) != 2 or min(self.image_size) < 1):
            raise ValueError(f"image_size must be None or a positive (H, W), got {self.image_size!r}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def replace(self, **changes) -> DatasetInfo:
        return dataclasses.replace(self, **changes)
