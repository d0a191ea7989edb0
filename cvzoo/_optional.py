"""Imports of optional packages, failing with the pip extra that brings them."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str, purpose: str = "") -> ModuleType:
    """Imports `module`, or raises ImportError naming the cvzoo extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        what = f" for {purpose}" if purpose else ""
        raise ImportError(
            f"{module!r} is needed{what} but is not installed; install it with: pip install 'cvzoo[{extra}]'"
        ) from err
