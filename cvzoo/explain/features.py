"""Feature visualisation in the style of lucid: optimise an image so that a model's chosen unit fires.

```python
from cvzoo.explain.features import channel, class_logit, visualize, save_png

images = visualize(model, channel("backbone.layer3", 17) + 0.5 * class_logit(3), size=128, steps=256)
save_png(images, "channel17.png")                       # images: (B, 3, H, W) in [0, 1]
```

The image is a parameterisation (`cvzoo.explain.param`: a 1/f-scaled Fourier spectrum by default, colour
decorrelated, sigmoid to [0, 1]); every step a batch of random translations, scales and rotations (lucid's
standard robustness set, one affine warp per image via kornia) keeps the result from exploiting pixel-exact
artefacts. Objectives read activations captured by forward hooks that live only for the call.
"""

from __future__ import annotations

import difflib
import math
import numbers
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvzoo._optional import require
from cvzoo.explain.param import FourierImage, ImageParam, PixelImage, _check_positive_int, _check_size

__all__ = [
    "Objective",
    "RandomTransforms",
    "capture",
    "channel",
    "class_logit",
    "l2_penalty",
    "neuron",
    "resolve_layer",
    "save_png",
    "total_variation",
    "visualize",
]

LayerRef = str | nn.Module  # a dotted path for model.get_submodule ("" is the model itself), or the module
Activations = Mapping[LayerRef, Any]  # layer reference -> what that module's forward returned


# ---------------------------------------------------------------------------------------------------- layers, hooks


def resolve_layer(model: nn.Module, layer: LayerRef) -> nn.Module:
    """A dotted path (`"backbone.layer3.1"`, `""` for the model) or a submodule of `model` -> that module.

    An unknown path raises a ValueError listing the closest names (difflib) among `model.named_modules()`.
    """
    if isinstance(layer, nn.Module):
        if not any(m is layer for m in model.modules()):
            raise ValueError(f"layer {type(layer).__name__} is not a submodule of the model {type(model).__name__}")
        return layer
    if not isinstance(layer, str):
        raise ValueError(f"layer must be a dotted module path (str) or an nn.Module, got {type(layer).__name__}")
    try:
        return model.get_submodule(layer)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(layer, names, n=5, cutoff=0.5)
        hint = f"did you mean {close}?" if close else f"known layers include {names[:12]}"
        raise ValueError(f"layer {layer!r} is not a submodule of {type(model).__name__}; {hint}") from None


def _describe(layer: LayerRef) -> str:
    return repr(layer) if isinstance(layer, str) else type(layer).__name__


@contextmanager
def capture(model: nn.Module, layers: Sequence[LayerRef]) -> Iterator[dict[LayerRef, Any]]:
    """Forward hooks on `layers` for the duration of the block; yields the dict they fill (layer -> output).

    All layers are resolved before any hook is registered, and every hook is removed on exit, also on error.
    """
    modules = {layer: resolve_layer(model, layer) for layer in layers}
    acts: dict[LayerRef, Any] = {}

    def store(layer: LayerRef) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            acts[layer] = output

        return hook

    handles = []
    try:
        for layer, module in modules.items():
            handles.append(module.register_forward_hook(store(layer)))
        yield acts
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------------------------------------------ objectives


class Objective:
    """A differentiable score per image of captured activations: `objective(acts) -> (B,)`, to be maximised.

    Objectives compose like lucid's: `a + b`, `a - b`, `-a`, `0.5 * a`, `a / 2`, `a * b` and `sum([a, b])`;
    `layers` is the union of what the parts read.
    """

    def __init__(self, fn: Callable[[Activations], Tensor], layers: Sequence[LayerRef], description: str) -> None:
        self.fn = fn
        self.layers: tuple[LayerRef, ...] = tuple(dict.fromkeys(layers))  # dedup, keep order
        self.description = description

    def __call__(self, acts: Activations) -> Tensor:
        return self.fn(acts)

    def evaluate(self, model: nn.Module, images: Tensor) -> Tensor:
        """Runs `model(images)` (in its current train/eval mode) with hooks on `self.layers` -> the objective (B,)."""
        with capture(model, self.layers) as acts:
            model(images)
            return self(acts)

    def __repr__(self) -> str:
        return f"Objective({self.description})"

    @staticmethod
    def _is_number(x: object) -> bool:
        return isinstance(x, numbers.Real) and not isinstance(x, bool)

    def __add__(self, other: object) -> Objective:
        if isinstance(other, Objective):
            return Objective(lambda a: self(a) + other(a), self.layers + other.layers, f"{self.description} + "
                             f"{other.description}")
        if self._is_number(other):
            return Objective(lambda a: self(a) + other, self.layers, f"{self.description} + {other}")
        return NotImplemented

    def __radd__(self, other: object) -> Objective:  # sum([a, b]) starts from 0
        return self.__add__(other)

    def __neg__(self) -> Objective:
        return Objective(lambda a: -self(a), self.layers, f"-({self.description})")

    def __sub__(self, other: object) -> Objective:
        if isinstance(other, Objective) or self._is_number(other):
            return self + (-other)
        return NotImplemented

    def __rsub__(self, other: object) -> Objective:
        return (-self).__add__(other)

    def __mul__(self, other: object) -> Objective:
        if isinstance(other, Objective):
            return Objective(lambda a: self(a) * other(a), self.layers + other.layers,
                             f"({self.description}) * ({other.description})")
        if self._is_number(other):
            return Objective(lambda a: other * self(a), self.layers, f"{other} * ({self.description})")
        return NotImplemented

    def __rmul__(self, other: object) -> Objective:
        return self.__mul__(other)

    def __truediv__(self, other: object) -> Objective:
        if self._is_number(other) and other != 0:
            return self * (1.0 / other)
        return NotImplemented


def _check_index(value: object, name: str, optional: bool = False) -> int | None:
    if optional and value is None:
        return None
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be an int >= 0{' or None' if optional else ''}, got {value!r}")
    return int(value)


def _check_layer_arg(layer: object) -> LayerRef:
    if not isinstance(layer, (str, nn.Module)):
        raise ValueError(f"layer must be a dotted module path (str) or an nn.Module, got {type(layer).__name__}")
    return layer


def _activation(acts: Activations, layer: LayerRef, ndim: tuple[int, ...]) -> Tensor:
    if layer not in acts:
        raise ValueError(f"layer {_describe(layer)} produced no output in the forward pass (is it used by forward?)")
    out = acts[layer]
    if not isinstance(out, Tensor) or out.ndim not in ndim:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"layer {_describe(layer)} must output a tensor with {' or '.join(map(str, ndim))} dims, "
                         f"got {got}")
    return out


def channel(layer: LayerRef, index: int) -> Objective:
    """Mean activation of channel `index` of `layer`: (B, C, H, W) -> (B,), or (B, C) -> (B,) for a linear layer."""
    layer, index = _check_layer_arg(layer), _check_index(index, "index")

    def fn(acts: Activations) -> Tensor:
        out = _activation(acts, layer, (2, 4))
        if index >= out.shape[1]:
            raise ValueError(f"index {index} is out of range for layer {_describe(layer)} with {out.shape[1]} "
                             f"channels (output shape {tuple(out.shape)})")
        return out[:, index] if out.ndim == 2 else out[:, index].mean(dim=(-2, -1))

    return Objective(fn, [layer], f"channel({_describe(layer)}, {index})")


def neuron(layer: LayerRef, index: int, x: int | None = None, y: int | None = None) -> Objective:
    """Activation of channel `index` of `layer` at column `x`, row `y` (default the centre W // 2, H // 2).

    (B, C, H, W) -> (B,).
    """
    layer, index = _check_layer_arg(layer), _check_index(index, "index")
    x, y = _check_index(x, "x", optional=True), _check_index(y, "y", optional=True)

    def fn(acts: Activations) -> Tensor:
        out = _activation(acts, layer, (4,))
        _, c, h, w = out.shape
        col, row = (w // 2 if x is None else x), (h // 2 if y is None else y)
        if index >= c or row >= h or col >= w:
            raise ValueError(f"neuron (index={index}, x={col}, y={row}) is outside layer {_describe(layer)}'s "
                             f"output of shape {tuple(out.shape)}")
        return out[:, index, row, col]

    return Objective(fn, [layer], f"neuron({_describe(layer)}, {index}, x={x}, y={y})")


def _logits(out: Any) -> Tensor:
    """A model's output -> its logits (B, K): a tensor, an output with a `.logits` field, or a dict with "logits"."""
    logits = out
    if not isinstance(out, Tensor):
        logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(out).__name__
        raise ValueError(f"class_logit needs the model to return logits (B, K) (a tensor, a `.logits` field or a "
                         f"'logits' key), got {got}")
    return logits


def class_logit(index: int) -> Objective:
    """Logit `index` of the model's output (B, K) -> (B,). Reads a tensor, `output.logits` or `output["logits"]`."""
    index = _check_index(index, "index")

    def fn(acts: Activations) -> Tensor:
        logits = _logits(acts[""]) if "" in acts else _activation(acts, "", (2,))
        if index >= logits.shape[1]:
            raise ValueError(f"index {index} is out of range for logits of shape {tuple(logits.shape)}")
        return logits[:, index]

    return Objective(fn, [""], f"class_logit({index})")


# ------------------------------------------------------------------------------------------------- regularisers


def total_variation(images: Tensor) -> Tensor:
    """Anisotropic total variation, (B, C, H, W) -> (B,): mean |horizontal difference| + mean |vertical difference|.

    Means rather than lucid's sums (`tf.image.total_variation`), so a weight means the same at every image size.
    """
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().flatten(1)  # (B, C*H*(W-1))
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().flatten(1)  # (B, C*(H-1)*W)
    return dx.sum(1) / max(dx.shape[1], 1) + dy.sum(1) / max(dy.shape[1], 1)


def l2_penalty(images: Tensor, centre: float = 0.5) -> Tensor:
    """Mean squared distance from grey, (B, C, H, W) -> (B,)."""
    return (images - centre).square().flatten(1).mean(1)


# --------------------------------------------------------------------------------------------------- transforms


class RandomTransforms(nn.Module):
    """lucid's standard robustness transforms, batched: pad, jitter, random scale, random rotation, jitter.

    (B, C, H, W) -> (B, C, H, W). The image is padded by `pad` with `pad_value`; each image then gets its own
    affine map (integer shift in [-jitter, jitter], scale uniform in `scale`, rotation uniform in
    [-degrees, degrees] about the centre, integer shift in [-jitter_after, jitter_after]), composed into one matrix
    and applied by `kornia.geometry.transform.warp_affine` (one resampling instead of lucid's three, border
    replication outside), and the centre H x W is cropped out so the model sees the input's size. The defaults
    match lucid's `standard_transforms`: its `jitter(8)` crops at an offset in [0, 8], a shift of +-4 about the
    centre, and its final `jitter(4)` one of +-2.
    """

    def __init__(
        self,
        *,
        pad: int = 12,
        pad_value: float = 0.5,
        jitter: int = 4,
        scale: tuple[float, float] = (0.9, 1.1),
        degrees: float = 10.0,
        jitter_after: int = 2,
    ) -> None:
        super().__init__()
        for name, value in (("pad", pad), ("jitter", jitter), ("jitter_after", jitter_after)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if (not isinstance(scale, (tuple, list)) or len(scale) != 2
                or not all(isinstance(s, numbers.Real) and math.isfinite(s) for s in scale)
                or not 0 < scale[0] <= scale[1]):
            raise ValueError(f"scale must be a (low, high) pair with 0 < low <= high, got {scale!r}")
        if not isinstance(degrees, numbers.Real) or not math.isfinite(degrees) or degrees < 0:
            raise ValueError(f"degrees must be a finite number >= 0, got {degrees!r}")
        self.pad, self.pad_value = int(pad), float(pad_value)
        self.jitter, self.jitter_after = int(jitter), int(jitter_after)
        self.scale = (float(scale[0]), float(scale[1]))
        self.degrees = float(degrees)

    def sample_matrices(self, batch: int, height: int, width: int, generator: torch.Generator | None = None) -> Tensor:
        """Random forward affine maps (B, 2, 3) in pixel coordinates of a `height` x `width` (padded) image."""
        require("kornia", "augment", "feature visualisation")
        from kornia.geometry.transform import get_rotation_matrix2d

        # drawn on the CPU so a seeded generator gives the same maps on every device
        shift1 = torch.randint(-self.jitter, self.jitter + 1, (batch, 2), generator=generator).double()
        shift2 = torch.randint(-self.jitter_after, self.jitter_after + 1, (batch, 2), generator=generator).double()
        lo, hi = self.scale
        scale = lo + (hi - lo) * torch.rand(batch, generator=generator, dtype=torch.float64)
        angle = self.degrees * (2 * torch.rand(batch, generator=generator, dtype=torch.float64) - 1)
        center = torch.tensor([(width - 1) / 2, (height - 1) / 2], dtype=torch.float64).expand(batch, 2)
        m = get_rotation_matrix2d(center, angle, scale[:, None].expand(batch, 2))  # (B, 2, 3): x -> R (x - c) + c
        # p -> R (p + shift1 - c) + c + shift2: shift, rotate/scale about the centre, shift again
        translation = m[:, :, 2] + (m[:, :, :2] @ shift1[:, :, None]).squeeze(-1) + shift2
        return torch.cat([m[:, :, :2], translation[:, :, None]], dim=2)

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W), a different random map per image."""
        require("kornia", "augment", "feature visualisation")
        from kornia.geometry.transform import warp_affine

        b, _, h, w = images.shape
        p = self.pad
        padded = F.pad(images, (p, p, p, p), value=self.pad_value)  # (B, C, H + 2p, W + 2p)
        m = self.sample_matrices(b, h + 2 * p, w + 2 * p, generator).to(images.device, images.dtype)
        warped = warp_affine(padded, m, dsize=(h + 2 * p, w + 2 * p), padding_mode="border", align_corners=True)
        return warped[..., p : p + h, p : p + w]


# ------------------------------------------------------------------------------------------------------- driver


def _check_weight(value: object, name: str) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def visualize(
    model: nn.Module,
    objective: Objective,
    *,
    size: int | tuple[int, int] = 128,
    steps: int = 256,
    lr: float = 0.05,
    param: str | ImageParam = "fourier",
    batch: int = 1,
    decorrelate: bool = True,
    decay_power: float = 1.0,
    transforms: bool | Callable[[Tensor], Tensor] = True,
    tv_weight: float = 0.0,
    l2_weight: float = 0.0,
    normalize: Callable[[Tensor], Tensor] | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Optimises images that maximise `objective` on `model`; returns them detached, (B, C, H, W) in [0, 1].

    Adam (lr) maximises `objective - tv_weight * total_variation - l2_weight * l2_penalty`, summed over the
    batch (each image independently), for `steps` steps (0 gives the initial image).

    - `param`: "fourier" (`FourierImage`, with `decay_power`) or "pixel" (`PixelImage`), built with `size`,
      `batch`, C = `model.signature.in_channels` (else 3) and `decorrelate` (only for C = 3); or an `ImageParam`
      to optimise further (then those arguments are not used).
    - `transforms`: True for `RandomTransforms()` each step, False for none, or any (B, C, H, W) -> same callable.
    - Images in [0, 1] are normalised before the model with `normalize` if given, else
      `model.signature.normalize` when the model has a cvzoo `signature`, else fed as they are.
    - The model runs in eval mode with its parameters frozen; afterwards every module's training flag and every
      parameter's `requires_grad` are restored, its `.grad`s are untouched, and the hooks are removed.
    - `seed` fixes the initial image and the transforms (CPU generator), so a run is reproducible.
    - `device`: where to optimise (default: the device of the model's parameters, else the CPU).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(objective, Objective):
        raise ValueError(f"objective must be an Objective (channel, neuron, class_logit, or sums of them), "
                         f"got {type(objective).__name__}")
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not isinstance(lr, numbers.Real) or isinstance(lr, bool) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    tv_weight, l2_weight = _check_weight(tv_weight, "tv_weight"), _check_weight(l2_weight, "l2_weight")
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if transforms is True:
        transform: Callable[..., Tensor] | None = RandomTransforms()
    elif transforms is False or transforms is None:
        transform = None
    elif callable(transforms):
        transform = transforms
    else:
        raise ValueError(f"transforms must be True, False or a callable on (B, C, H, W), got {transforms!r}")
    if normalize is not None and not callable(normalize):
        raise ValueError(f"normalize must be a callable on (B, C, H, W) images in [0, 1], got {normalize!r}")
    signature = getattr(model, "signature", None)
    if normalize is None:
        normalize = getattr(signature, "normalize", None) or (lambda images: images)

    first = next(model.parameters(), None)
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    device = torch.device(device) if device is not None else (first.device if first is not None else None)
    generator = torch.Generator().manual_seed(int(seed))
    if isinstance(param, ImageParam):
        image = param
    elif param in ("fourier", "pixel"):
        channels = int(getattr(signature, "in_channels", 3))
        size, batch = _check_size(size), _check_positive_int(batch, "batch")
        colour = bool(decorrelate) and channels == 3
        if param == "fourier":
            image = FourierImage(size, batch, channels, decay_power, decorrelate=colour, generator=generator)
        else:
            image = PixelImage(size, batch, channels, decorrelate=colour, generator=generator)
    else:
        raise ValueError(f"param must be 'fourier', 'pixel' or an ImageParam, got {param!r}")
    image = image.to(device=device, dtype=dtype)

    training = {m: m.training for m in model.modules()}
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    optimizer = torch.optim.Adam(image.parameters(), lr=lr)
    try:
        model.eval()
        for p in requires_grad:
            p.requires_grad_(False)  # gradients flow to the image only; the model's .grad stays as it was
        with capture(model, objective.layers) as acts:
            for _ in range(int(steps)):
                optimizer.zero_grad(set_to_none=True)
                images = image()  # (B, C, H, W) in [0, 1]
                seen = images if transform is None else (
                    transform(images, generator) if isinstance(transform, RandomTransforms) else transform(images))
                acts.clear()
                model(normalize(seen))
                loss = -objective(acts).sum()
                if tv_weight:
                    loss = loss + tv_weight * total_variation(images).sum()
                if l2_weight:
                    loss = loss + l2_weight * l2_penalty(images).sum()
                loss.backward()
                optimizer.step()
    finally:
        for m, flag in training.items():
            m.training = flag
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
    with torch.no_grad():
        return image().detach()


def save_png(images: Tensor, path: str | os.PathLike, *, nrow: int = 8) -> Path:
    """Writes (C, H, W) or (B, C, H, W) images in [0, 1] (C in {1, 3}) as one PNG with PIL, a batch as a grid of
    `nrow` per row; creates the folder and returns the path."""
    from cvzoo.visualize import make_grid_image, save_image_png

    if not isinstance(images, Tensor) or images.ndim not in (3, 4):
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be (C, H, W) or (B, C, H, W) in [0, 1], got {got}")
    if images.ndim == 4:
        if images.shape[0] == 0:
            raise ValueError(f"images is an empty batch (shape {tuple(images.shape)})")
        images = images[0] if images.shape[0] == 1 else make_grid_image(images.detach().cpu(), nrow=nrow)
    return save_image_png(images, path)
