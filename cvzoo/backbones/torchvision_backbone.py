"""torchvision classification models as cvzoo backbones, like torchvision's detection backbones."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import FrozenBatchNorm2d

from cvzoo.backbones.base import Backbone
from cvzoo.backbones.weights import load_pretrained
from cvzoo.layers import NormLayer
from cvzoo.types import FeatureInfo

_FAMILIES = ("resnet", "resnext", "wide_resnet", "regnet", "mobilenet_v2", "mobilenet_v3", "efficientnet", "convnext")


def _family(name: str) -> str:
    for fam in _FAMILIES:
        if name.startswith(fam):
            return fam
    raise ValueError(f"name {name!r} is not a supported torchvision backbone; expected a model of the families "
                     f"{', '.join(_FAMILIES)} (e.g. 'resnet50', 'mobilenet_v3_large', 'efficientnet_b0')")


def _steps(model: nn.Module, family: str) -> list[tuple[str, int]]:
    """The model's trunk as (module path, downsampling of that step) in execution order, classifier left out."""
    if family in ("resnet", "resnext", "wide_resnet"):
        return [("conv1", 2), ("bn1", 1), ("relu", 1), ("maxpool", 2)] + [(f"layer{i}", 1 if i == 1 else 2)
                                                                         for i in range(1, 5)]
    if family == "regnet":  # every stage halves; the stride sits on a block with a parallel projection
        return [("stem", 2)] + [(f"trunk_output.block{i}", 2) for i in range(1, 5)]
    # `features` trunks (MobileNet, EfficientNet, ConvNeXt) have no strided parallel branch, so a step's
    # downsampling is the product of its convs' strides
    steps = []
    for i, step in enumerate(model.features):
        stride = 1
        for m in step.modules():
            if isinstance(m, nn.Conv2d):
                stride *= m.stride[0]
        steps.append((f"features.{i}", stride))
    return steps


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replaces every BatchNorm2d under `module` by a FrozenBatchNorm2d with the same eps and statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batch_norm(child)
    return module


def _is_local_file(weights: object) -> bool:
    return isinstance(weights, os.PathLike) or (
        isinstance(weights, str) and (weights.endswith((".pth", ".pt", ".safetensors")) or Path(weights).is_file())
    )


class TorchvisionBackbone(Backbone):
    """torchvision classifier trunk -> feature pyramid. (B, 3, H, W) -> [(B, C_i, H / s_i, W / s_i)].

    `return_layers`: module paths of the maps to return, e.g. ("layer2", "layer3", "layer4") or
    ("features.3", "features.6", "features.12"); the default takes the last module at each of the
    strides 8, 16, 32. `weights`: a torchvision weights name or enum ("DEFAULT", "IMAGENET1K_V1"),
    or a local .pth/.safetensors file of the full classifier's state dict.

    As in torchvision's detection backbones, pretrained batch-norm models use FrozenBatchNorm2d
    (`norm_layer=None`), and `frozen_stages` defaults to 1 with weights (torchvision's
    `trainable_layers=3`) and -1 without. `freeze_stages(n)` freezes the first n + 1 stride groups:
    everything computed at the smallest stride (the stem), then each further stride.
    """

    def __init__(
        self,
        name: str,
        return_layers: Sequence[str] | None = None,
        weights: str | os.PathLike | None = None,
        norm_layer: NormLayer | None = None,
        frozen_stages: int | None = None,
        grad_checkpointing: bool = False,
        **model_kwargs,
    ) -> None:
        super().__init__()
        import torchvision

        family = _family(name)
        if name not in torchvision.models.list_models(module=torchvision.models):
            raise ValueError(f"name {name!r} is not a torchvision classification model")
        local = _is_local_file(weights)
        pretrained = weights is not None
        if norm_layer is not None:
            model_kwargs["norm_layer"] = norm_layer
        model = torchvision.models.get_model(name, weights=None if local else weights, **model_kwargs)
        if local:
            load_pretrained(model, weights, None)
        if norm_layer is None and pretrained:  # each BN frozen with its own eps (1e-3 in several families)
            freeze_batch_norm(model)

        steps = _steps(model, family)
        paths = [p for p, _ in steps]
        cumulative, s = [], 1
        for _, step_stride in steps:
            s *= step_stride
            cumulative.append(s)
        if return_layers is None:
            return_layers = [max((p for p, c in zip(paths, cumulative) if c == t), key=paths.index)
                             for t in (8, 16, 32)]
        unknown = [p for p in return_layers if p not in paths]
        if unknown or not return_layers:
            raise ValueError(f"return_layers {list(return_layers)!r} must be trunk modules of {name}: {paths}")
        order = [paths.index(p) for p in return_layers]
        if order != sorted(set(order)):
            raise ValueError(f"return_layers {list(return_layers)!r} must be in execution order without repeats")

        kept = paths[: order[-1] + 1]  # nothing past the deepest returned map is built into the backbone
        self.body = nn.ModuleDict({p.replace(".", "_"): model.get_submodule(p) for p in kept})
        self.return_layers = tuple(p.replace(".", "_") for p in return_layers)
        self.name = name
        self._stride_groups = self._group_by_stride(kept, cumulative)
        info = [FeatureInfo(self._out_channels(paths[: i + 1], model), cumulative[i]) for i in order]
        self._declare(info, in_channels=3)
        self._with_params = {k for k, m in self.body.items() if next(m.parameters(), None) is not None}
        self.set_grad_checkpointing(grad_checkpointing)
        self.freeze_stages((1 if pretrained else -1) if frozen_stages is None else frozen_stages)

    @staticmethod
    def _out_channels(paths: list[str], model: nn.Module) -> int:
        """Channels after the last of `paths`: the output of the last Conv2d up to there."""
        for p in reversed(paths):
            convs = [m for m in model.get_submodule(p).modules() if isinstance(m, nn.Conv2d)]
            if convs:
                return convs[-1].out_channels
        raise ValueError(f"no convolution before {paths[-1]!r}")

    @staticmethod
    def _group_by_stride(paths: list[str], cumulative: list[int]) -> list[list[str]]:
        groups: dict[int, list[str]] = {}
        for p, c in zip(paths, cumulative):
            groups.setdefault(c, []).append(p.replace(".", "_"))
        return list(groups.values())

    def frozen_stage_modules(self) -> list[nn.Module]:
        return [nn.ModuleList(self.body[k] for k in group) for group in self._stride_groups]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoints each trunk step with parameters. In-place activations are turned off then: an
        in-place ReLU between two checkpointed steps would modify a tensor autograd saved."""
        super().set_grad_checkpointing(enable)
        if enable:
            for m in self.body.modules():
                if getattr(m, "inplace", False):
                    m.inplace = False

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = []
        for key, step in self.body.items():
            if (self.grad_checkpointing and self.training and torch.is_grad_enabled()
                    and key in self._with_params):
                x = checkpoint(step, x, use_reentrant=False)
            else:
                x = step(x)
            if key in self.return_layers:
                feats.append(x)
        return feats
