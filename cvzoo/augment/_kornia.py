"""Lazy access to kornia.augmentation: `import cvzoo.augment` does not import kornia."""

from __future__ import annotations

from types import ModuleType

from cvzoo._optional import require


def kornia_augmentation() -> ModuleType:
    """Returns `kornia.augmentation`, or raises ImportError naming the `augment` extra."""
    require("kornia", "augment", "augmentation")
    import kornia.augmentation

    return kornia.augmentation
