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


# strided shortcut branches that run beside a block's main path (ResNet's `downsample`, RegNet's `proj`)
_PARALLEL_BRANCHES = ("downsample", "proj")


def _module_stride(module: nn.Module) -> int:
    """Downsampling of `module`, read from its layers (never from a forward): the product of the strides
    of its convs and pooling layers, shortcut branches left out (they run in parallel with the same
    stride). torchvision builds dilated stages (`replace_stride_with_dilation`, MobileNetV3's
    `dilated=True`) with stride-1 convs, so they count 1 here."""
    stride = 1
    for name, m in module.named_modules():
        if any(part in _PARALLEL_BRANCHES for part in name.split(".")):
            continue
        if isinstance(m, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d):
            s = m.stride if isinstance(m.stride, int) else m.stride[0]
            stride *= int(s)
    return stride


def _steps(model: nn.Module, family: str) -> list[tuple[str, int]]:
    """The model's trunk as (module path, downsampling of that step) in execution order, classifier left out."""
    if family in ("resnet", "resnext", "wide_resnet"):
        paths = ["conv1", "bn1", "relu", "maxpool"] + [f"layer{i}" for i in range(1, 5)]
    elif family == "regnet":
        paths = ["stem"] + [f"trunk_output.block{i}" for i in range(1, 5)]
    else:  # `features` trunks (MobileNet, EfficientNet, ConvNeXt)
        paths = [f"features.{i}" for i in range(len(model.features))]
    return [(p, _module_stride(model.get_submodule(p))) for p in paths]


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
    strides 8, 16, 32 that the trunk reaches. `weights`: a torchvision weights name or enum ("DEFAULT",
    "IMAGENET1K_V1"), or a local .pth/.safetensors file of the full classifier's state dict.
    `model_kwargs` go to torchvision's builder.

    Strides are read from the modules (conv and pooling strides along the main path), so dilated
    trunks declare their true strides: `mobilenet_v3_large` with `dilated=True` keeps stride 16 after
    `features.6` (LR-ASPP's "low" = `features.4` at stride 8, "high" = `features.16` at 16), and
    `resnet50` with `replace_stride_with_dilation=[False, True, True]` returns layer3 and layer4 at
    stride 8. The default return layers of a dilated trunk are then fewer (8 and 16; or 8 only).

    As in torchvision's detection backbones, pretrained batch-norm models use FrozenBatchNorm2d
    (`norm_layer=None`), and `frozen_stages` defaults to 1 with weights (torchvision's
    `trainable_layers=3`) and -1 without. `freeze_stages(n)` freezes the first n + 1 stride groups:
    everything computed at the smallest stride (the stem), then each further stride (dilated stages
    share their output stride's group, so a dilated trunk has fewer groups).
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
        if return_layers is None:  # a dilated trunk stops short of 32 (or 16): it returns fewer maps
            return_layers = [max((p for p, c in zip(paths, cumulative) if c == t), key=paths.index)
                             for t in (8, 16, 32) if t in cumulative]
            if not return_layers:
                raise ValueError(f"{name} reaches none of the strides 8, 16, 32 (its steps reach "
                                 f"{sorted(set(cumulative))}); pass return_layers")
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
