"""cvzoo: composable PyTorch building blocks for computer vision.

`import cvzoo` stays light: it imports torch and the shared types; subpackages load on first use
(`cvzoo.backbones`, `cvzoo.necks`, ...), and optional packages (timm, kornia, ...) only where used.
"""

from __future__ import annotations

import importlib

from cvzoo.types import FeatureInfo, Signature

__version__ = "0.1.0"

_SUBPACKAGES = ("layers", "backbones", "necks", "heads", "classification", "detection", "data", "augment", "train",
                "explain", "visualize", "experiment", "profiling", "zoo", "cli", "segmentation", "generative", "ssl",
                "adapt", "implicit", "hyper")

__all__ = ["FeatureInfo", "Signature", "__version__", *_SUBPACKAGES]


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"cvzoo.{name}")
    raise AttributeError(f"module 'cvzoo' has no attribute {name!r}")
