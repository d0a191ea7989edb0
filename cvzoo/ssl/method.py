"""What the self-supervised task models share: argument checks, pooled backbone features, views built on the
device from a normalised batch (`_ViewsMixin`), and a momentum schedule read from a step buffer
(`_MomentumMixin`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cvzoo.ssl.momentum import cosine_momentum, update_momentum
from cvzoo.ssl.views import denormalize
from cvzoo.types import Signature, cast_like_parameters


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_unit(name: str, value: object) -> float:
    """A momentum: a number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_temperature(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number (a softmax temperature), got {value!r}")
    return float(value)


def _check_max_steps(max_steps: object) -> int | None:
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"max_steps must be None (constant momentum) or an int >= 1 (the length of the cosine "
                         f"momentum schedule), got {max_steps!r}")
    return max_steps


def _check_size(name: str, value: object) -> tuple[int, int] | None:
    if value is None:
        return None
    size = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size)):
        raise ValueError(f"{name} must be None (the input's size), a positive int or an (H, W) pair, got {value!r}")
    return (int(size[0]), int(size[1]))


def _pool(backbone: nn.Module, images: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, D): the backbone's last feature map, averaged over space."""
    return backbone(images)[-1].mean((2, 3))


class _ViewsMixin:
    """The task-model side of the contract: validate, go to [0, 1], build the views, normalise them.

    `views` given: used as is. Otherwise `_default_views(size)` builds the method's augmentation for the crop
    size `image_size`, or -- when `image_size` is None -- for the size of the incoming batch; that module is
    rebuilt only when the images' (H, W) or device changes and is kept out of the module tree (and the
    state_dict), so a checkpoint does not depend on the sizes seen.
    """

    signature: Signature
    views: nn.Module | None
    _auto_views: tuple[tuple, nn.Module] | None

    def _default_views(self, size: tuple[int, int]) -> nn.Module:
        raise NotImplementedError

    def _init_views(self, backbone: nn.Module, views: nn.Module | None, image_size: object) -> None:
        """The backbone's signature, a checked `image_size`, and `views` (or the default views at `image_size`,
        or none yet: built per input size by `_make_views`)."""
        self.signature = backbone.signature
        self.image_size = _check_size("image_size", image_size)
        self._auto_views = None
        self.views = views if views is not None or self.image_size is None else self._default_views(self.image_size)

    def _make_views(self, images: Tensor, *, min_batch: int, num_views: int | None) -> list[Tensor]:
        images = cast_like_parameters(self.signature.validate(images), self)  # type: ignore[arg-type]
        if images.shape[0] < min_batch:
            raise ValueError(f"images has batch size {images.shape[0]}; {type(self).__name__} needs at least "
                             f"{min_batch} images (its loss uses batch statistics)")
        sig = self.signature
        x = denormalize(images, sig.mean, sig.std).clamp(0.0, 1.0)  # the augmentations work in [0, 1]
        views = self.views
        if views is None:
            key = (tuple(images.shape[-2:]), images.device)
            if self._auto_views is None or self._auto_views[0] != key:
                # a tuple attribute, not a submodule: the size-dependent module stays out of the state_dict
                self._auto_views = (key, self._default_views(key[0]).to(images.device))
            views = self._auto_views[1]
        out = views(x)
        if not isinstance(out, (list, tuple)) or (num_views is not None and len(out) != num_views):
            got = len(out) if isinstance(out, (list, tuple)) else type(out).__name__
            raise ValueError(f"views must return a list of {num_views} view batches for {type(self).__name__}, "
                             f"got {got}")
        return [sig.normalize(v.to(images.dtype)) for v in out]


class _MomentumMixin:
    """The momentum schedule read from the `step` buffer: constant `base_momentum` when `max_steps` is None, else
    BYOL's cosine schedule from `base_momentum` to `final_momentum` over `max_steps` calls."""

    step: Tensor
    max_steps: int | None
    base_momentum: float
    final_momentum: float

    def current_momentum(self) -> Tensor:
        """The momentum the next training-mode `loss` call uses (a 0-d tensor on the step buffer's device)."""
        if self.max_steps is None:
            return torch.full((), self.base_momentum, device=self.step.device)
        return cosine_momentum(self.step, self.max_steps, self.base_momentum, self.final_momentum)

    def _step_momentum(self, pairs: Sequence[tuple[nn.Module, nn.Module]]) -> Tensor:
        """Training mode: target <- m * target + (1 - m) * online for each (online, target), then step += 1."""
        m = self.current_momentum()
        for online, target in pairs:
            update_momentum(online, target, m)
        self.step.add_(1)
        return m
