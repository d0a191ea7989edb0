"""Class activation maps: Grad-CAM, Grad-CAM++, XGrad-CAM, LayerCAM, Score-CAM and Eigen-CAM, one interface.

```python
with GradCAM(model, target_layers=["backbone.layer4"]) as cam:
    maps = cam(images, targets=None)  # (B, C, H, W) -> (B, H, W) float32 in [0, 1]
```

The maps follow pytorch-grad-cam's conventions, so they agree with it to float32 rounding (tested to 1e-4):
for each target layer the raw map (B, h, w) goes through ReLU, then per-image min-max scaling
`m = m - min(m); m = m / (max(m) + 1e-7)` (its `scale_cam_image`), then a bilinear resize to the input's
(H, W) (align_corners=False, which is cv2.resize's INTER_LINEAR); the resized maps are averaged over the
layers (one layer: itself) and the result is scaled again the same way.

One forward and one backward for the whole batch (Score-CAM: a forward per chunk of masked images).
Forward hooks record the target layers' outputs; no tensor or backward hooks are needed, since gradients
are `torch.autograd.grad` of the sum of the per-image target scalars w.r.t. those recorded outputs.
Parameters' `.grad`, `requires_grad` flags and the training flag are left alone (run the model in eval
mode: in training mode batch norm couples the images and updates its statistics; a warning says so).
Hooks live only during the forward pass of each call. Works under `torch.no_grad()` and
`torch.inference_mode()` (grad is enabled inside), under autocast (maps computed in float32), with
channels_last, and on models wrapped by torch.compile, DistributedDataParallel or DataParallel (the
unwrapped module runs, see `hooks.unwrap`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvzoo.explain.hooks import ActivationRecorder, LayerArg, rebuild, resolve_layers, tensor_leaves, unwrap
from cvzoo.explain.targets import ClassifierTarget, DetectionTarget

Target = Callable[[object, int], Tensor]  # (model output, image index) -> scalar
TargetsArg = Target | Sequence[Target] | None
Runner = Callable[[nn.Module, Tensor], object]


def scale_cam(maps: Tensor, eps: float = 1e-7) -> Tensor:
    """Per-image min-max scaling, pytorch-grad-cam's `scale_cam_image`. (B, h, w) -> (B, h, w) in [0, 1]."""
    maps = maps - maps.amin(dim=(-2, -1), keepdim=True)
    return maps / (maps.amax(dim=(-2, -1), keepdim=True) + eps)


def _combine(maps: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
    """Per-layer (B, h_l, w_l) raw maps -> (B, H, W): ReLU, scale, resize per layer; mean over layers, scale."""
    resized = [F.interpolate(scale_cam(m.clamp(min=0))[:, None], size=size, mode="bilinear", align_corners=False)
               for m in maps]  # [(B, 1, H, W)]
    return scale_cam(torch.cat(resized, dim=1).clamp(min=0).mean(dim=1))


@contextmanager
def _float32(device: torch.device):
    """Map arithmetic outside the caller's autocast (inputs are cast to float32 explicitly)."""
    if device.type in ("cpu", "cuda"):
        with torch.autocast(device.type, enabled=False):
            yield
    else:
        yield


def _call_model(model: nn.Module, images: Tensor) -> object:
    return model(images)


def _runner(targets: Sequence[Target]) -> Runner:
    """How the targets run the model: their common `model_output`, or `model(images)`."""
    kinds: dict[object, str] = {}
    for t in targets:
        kinds.setdefault(getattr(type(t), "model_output", None), type(t).__name__)
    if len(kinds) > 1:
        raise ValueError(f"targets must all run the model the same way (one forward for the batch); got "
                         f"{sorted(set(kinds.values()))}")
    fn = getattr(targets[0], "model_output", None)
    return fn if callable(fn) else _call_model


def _check_images(images: object) -> Tensor:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[0] == 0 or not images.is_floating_point():
        got = f"shape {tuple(images.shape)}, dtype {images.dtype}" if isinstance(images, Tensor) else type(images)
        raise ValueError(f"images must be a non-empty floating (B, C, H, W) tensor, got {got}")
    return images


def _scalar(value: object, index: int) -> Tensor:
    if not isinstance(value, Tensor) or value.numel() != 1:
        got = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"targets[{index}] must return one scalar tensor for image {index}, got {got}")
    return value.reshape(()).float()


class BaseCAM:
    """Shared machinery: layers, hooks, targets, gradients and the combination of per-layer maps.

    `target_layers`: dotted names from the model (any depth, e.g. "backbone.model.layer4" for a timm
    model inside a `TimmBackbone`; compile/DDP prefixes optional) or the modules themselves. Each must run
    once per forward and return a (B, C, h, w) tensor; `reshape_transform` turns any other output (a
    (B, N, C) token tensor, a list of pyramid maps) into one, and is applied to gradients alike.

    `targets` (see `cvzoo.explain.targets`): None (the top class, or the top detection for models with
    `dense_predictions`), one target for every image, or a list of one per image. A target is a callable
    `(model_output, index) -> scalar`; `CAMTarget`s also say how to run the model.

    Subclasses implement `cam_image(activations (B, C, h, w), gradients (B, C, h, w) or None) -> (B, h, w)`
    (float32, before ReLU and scaling).
    """

    uses_gradients: ClassVar[bool] = True
    uses_targets: ClassVar[bool] = True

    def __init__(self, model: nn.Module, *, target_layers: Sequence[LayerArg] | LayerArg,
                 reshape_transform: Callable[[object], Tensor] | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        if reshape_transform is not None and not callable(reshape_transform):
            raise ValueError(f"reshape_transform must be callable or None, got {reshape_transform!r}")
        self.model = model
        self.module = unwrap(model)
        self.target_layers = resolve_layers(model, target_layers)  # ((name, module), ...)
        self.reshape_transform = reshape_transform
        self._recorder = ActivationRecorder(self.target_layers)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={type(self.model).__name__}, target_layers={self.layer_names})"

    @property
    def layer_names(self) -> list[str]:
        return [name for name, _ in self.target_layers]

    # ---- lifetime --------------------------------------------------------------------------------

    def close(self) -> None:
        """Removes any hook still registered and drops recorded tensors (hooks already go after each call)."""
        self._recorder.remove()
        self._recorder.clear()

    def __enter__(self) -> BaseCAM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the call --------------------------------------------------------------------------------

    def default_target(self) -> Target:
        is_detector = callable(getattr(self.module, "dense_predictions", None))
        return DetectionTarget() if is_detector else ClassifierTarget()

    def _targets(self, targets: TargetsArg, batch: int) -> list[Target]:
        if targets is None:
            return [self.default_target()] * batch
        if callable(targets) and not isinstance(targets, Sequence):
            return [targets] * batch
        if isinstance(targets, Sequence) and not isinstance(targets, str):
            if len(targets) != batch:
                raise ValueError(f"targets has {len(targets)} entries for a batch of {batch} images; expected one "
                                 "per image, or a single target for all")
            for i, t in enumerate(targets):
                if not callable(t):
                    raise ValueError(f"targets[{i}] must be a target callable (output, index) -> scalar, e.g. "
                                     f"ClassifierTarget(3); got {t!r:.80}")
            return list(targets)
        raise ValueError(f"targets must be None, a target callable (output, index) -> scalar such as "
                         f"ClassifierTarget(3), or a list of one per image; got {targets!r:.80}")

    def __call__(self, images: Tensor, targets: TargetsArg = None) -> Tensor:
        """(B, C, H, W) images -> (B, H, W) float32 maps in [0, 1] on the images' device."""
        images = _check_images(images)
        batch, size = images.shape[0], (images.shape[-2], images.shape[-1])
        if self.uses_targets or targets is not None:
            target_list = self._targets(targets, batch)
            runner = _runner(target_list)
        else:
            target_list, runner = [], _call_model
        if self.module.training:
            warnings.warn(f"{type(self).__name__}: the model is in training mode (batch norm couples the images "
                          "and updates its statistics, dropout is random); call model.eval() first", stacklevel=2)
        with torch.inference_mode(False), torch.enable_grad():
            if images.is_inference():
                images = images.clone()
            try:
                with self._recorder.attached(), self._recorder.recording():
                    output = runner(self.module, images)
                raw = self._recorder.take()
            finally:
                self._recorder.clear()
            bound = [t.resolve(output, i) if callable(getattr(t, "resolve", None)) else t
                     for i, t in enumerate(target_list)] if self.uses_targets else []
            raw_grads = self._gradients(output, bound, raw) if self.uses_gradients else [None] * len(raw)
            del output
        acts = [self._as_maps(r, name, batch).detach() for r, (name, _) in zip(raw, self.target_layers)]
        grads = [None if g is None else self._as_maps(g, name, batch)
                 for g, (name, _) in zip(raw_grads, self.target_layers)]
        del raw, raw_grads
        maps = self.layer_maps(images, bound, acts, grads)
        with _float32(images.device):
            return _combine(maps, size)

    def _gradients(self, output: object, bound: Sequence[Target], raw: Sequence[object]) -> list[object]:
        """d(sum_i target_i(output, i)) / d(each recorded layer output), in the layer output's structure."""
        total = torch.stack([_scalar(t(output, i), i) for i, t in enumerate(bound)]).sum()
        if not total.requires_grad:
            raise ValueError("targets: the target values do not depend on the model's output (no gradient); "
                             "a target must index the output without detaching it")
        leaves = [self._leaves(r, name) for r, (name, _) in zip(raw, self.target_layers)]
        wrt = [t for layer in leaves for t in layer if t.requires_grad]
        found = iter(torch.autograd.grad(total, wrt, allow_unused=True))
        out = []
        for (name, _), r, layer in zip(self.target_layers, raw, leaves):
            grads = [next(found) if t.requires_grad else None for t in layer]
            if all(g is None for g in grads):
                raise ValueError(f"target_layers: layer {name!r} does not influence the targets (no gradient "
                                 "reaches it); choose a layer on the path to the explained output")
            out.append(rebuild(r, [torch.zeros_like(t) if g is None else g for t, g in zip(layer, grads)]))
        return out

    def _leaves(self, raw: object, name: str) -> list[Tensor]:
        leaves = tensor_leaves(raw)
        if leaves is None:
            raise ValueError(f"target_layers: layer {name!r} returns a {type(raw).__name__}; expected a tensor "
                             "(or a list of tensors with a reshape_transform)")
        return leaves

    def _as_maps(self, raw: object, name: str, batch: int) -> Tensor:
        """A layer's output (or its gradient) -> (B, C, h, w) float32."""
        x = raw if self.reshape_transform is None else self.reshape_transform(raw)
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[0] != batch:
            got = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else f"a {type(x).__name__}"
            how = "reshape_transform returns" if self.reshape_transform is not None else "returns"
            raise ValueError(f"target_layers: layer {name!r} {how} {got}; expected (B={batch}, C, h, w) (pass a "
                             "reshape_transform for token or list outputs)")
        return x.float()

    def layer_maps(self, images: Tensor, targets: Sequence[Target], activations: Sequence[Tensor],
                   gradients: Sequence[Tensor | None]) -> list[Tensor]:
        """Raw per-layer maps [(B, h_l, w_l)] from (B, C, h_l, w_l) float32 activations and gradients."""
        with _float32(images.device):
            return [self.cam_image(a, g) for a, g in zip(activations, gradients)]

    def cam_image(self, activations: Tensor, gradients: Tensor | None) -> Tensor:
        raise NotImplementedError


class GradCAM(BaseCAM):
    """Grad-CAM (Selvaraju et al. 2017): channel weights = spatial mean of the gradients; map = sum_c w_c A_c."""

    def cam_image(self, activations: Tensor, gradients: Tensor | None) -> Tensor:
        weights = gradients.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        return (weights * activations).sum(dim=1)


class GradCAMPlusPlus(BaseCAM):
    """Grad-CAM++ (Chattopadhyay et al. 2018), the closed form of their eq. 19 for an exponential of the score
    (higher derivatives become powers of the gradient g), as pytorch-grad-cam computes it:
    alpha = g^2 / (2 g^2 + sum_ij(A) g^3 + 1e-6), zero where g = 0; w_c = sum_ij alpha relu(g)."""

    def cam_image(self, activations: Tensor, gradients: Tensor | None) -> Tensor:
        g2 = gradients.square()
        g3 = g2 * gradients
        sum_a = activations.sum(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        alpha = g2 / (2 * g2 + sum_a * g3 + 1e-6)
        alpha = torch.where(gradients != 0, alpha, torch.zeros_like(alpha))
        weights = (gradients.clamp(min=0) * alpha).sum(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        return (weights * activations).sum(dim=1)


class XGradCAM(BaseCAM):
    """XGrad-CAM (Fu et al. 2020): w_c = sum_ij g A / (sum_ij A + 1e-7); map = sum_c w_c A_c."""

    def cam_image(self, activations: Tensor, gradients: Tensor | None) -> Tensor:
        sum_a = activations.sum(dim=(2, 3), keepdim=True)
        weights = (gradients * activations / (sum_a + 1e-7)).sum(dim=(2, 3), keepdim=True)
        return (weights * activations).sum(dim=1)


class LayerCAM(BaseCAM):
    """LayerCAM (Jiang et al. 2021): element-wise weights, map = sum_c relu(g_c) * A_c."""

    def cam_image(self, activations: Tensor, gradients: Tensor | None) -> Tensor:
        return (gradients.clamp(min=0) * activations).sum(dim=1)


class EigenCAM(BaseCAM):
    """Eigen-CAM (Muhammad & Yeasin 2020): the activations projected on their first principal component.

    No gradients and no targets: the map is class-agnostic (targets, when given, only choose how the model
    runs, e.g. `dense_predictions` for a detection target). Per image the (h*w, C) activations are centred
    per channel and projected on the first right-singular vector. SVD leaves that vector's sign arbitrary,
    so it is fixed as Seg-Eigen-CAM does (pytorch-grad-cam's `get_2d_projection_with_sign_correction`):
    the projection is negated when |min| > |max|. pytorch-grad-cam's EigenCAM keeps LAPACK's sign.
    """

    uses_gradients = False
    uses_targets = False

    def cam_image(self, activations: Tensor, gradients: Tensor | None) -> Tensor:
        b, c, h, w = activations.shape
        x = activations.nan_to_num(0.0).flatten(2).transpose(1, 2).double()  # (B, hw, C)
        x = x - x.mean(dim=1, keepdim=True)
        _, _, vh = torch.linalg.svd(x, full_matrices=False)  # vh: (B, min(hw, C), C)
        proj = (x @ vh[:, 0, :, None])[..., 0]  # (B, hw)
        flip = proj.amin(dim=1).abs() > proj.amax(dim=1).abs()
        proj = torch.where(flip[:, None], -proj, proj)
        return proj.reshape(b, h, w).float()


class ScoreCAM(BaseCAM):
    """Score-CAM (Wang et al. 2020): each channel, upsampled and min-max scaled to [0, 1], masks the image;
    the channel's weight is the softmax over channels of the target's score on the masked image.

    As pytorch-grad-cam: upsampling is bilinear with align_corners=True, the mask is
    (a - min) / (max - min + 1e-8). The B * C masked images run through the model in chunks of
    `batch_size` under no_grad, with the targets resolved on the clean images (the class or detection
    chosen there is the one scored on every masked copy).
    """

    uses_gradients = False

    def __init__(self, model: nn.Module, *, target_layers: Sequence[LayerArg] | LayerArg,
                 reshape_transform: Callable[[object], Tensor] | None = None, batch_size: int = 32) -> None:
        super().__init__(model, target_layers=target_layers, reshape_transform=reshape_transform)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.batch_size = batch_size

    def layer_maps(self, images: Tensor, targets: Sequence[Target], activations: Sequence[Tensor],
                   gradients: Sequence[Tensor | None]) -> list[Tensor]:
        runner = _runner(targets)
        size = (images.shape[-2], images.shape[-1])
        maps = []
        for acts in activations:
            b, c = acts.shape[:2]
            scores = torch.empty(b * c, device=acts.device)
            for start in range(0, b * c, self.batch_size):  # chunks of the flattened (image, channel) pairs
                rows = torch.arange(start, min(start + self.batch_size, b * c), device=acts.device)
                image_idx, channel = rows // c, rows % c
                with _float32(images.device):
                    up = F.interpolate(acts[image_idx, channel][:, None], size=size, mode="bilinear",
                                       align_corners=True)  # (n, 1, H, W)
                    low, high = up.amin(dim=(2, 3), keepdim=True), up.amax(dim=(2, 3), keepdim=True)
                    masked = images[image_idx] * ((up - low) / (high - low + 1e-8)).to(images.dtype)
                with torch.no_grad():
                    out = runner(self.module, masked)
                    for j, i in enumerate(image_idx.tolist()):
                        scores[start + j] = _scalar(targets[i](out, j), i)
            with _float32(images.device):
                weights = scores.view(b, c).softmax(dim=-1)[:, :, None, None]  # (B, C, 1, 1)
                maps.append((weights * acts).sum(dim=1))
        return maps
