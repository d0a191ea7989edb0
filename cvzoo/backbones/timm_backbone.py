"""Any timm model as a cvzoo backbone, through timm's feature extraction (`features_only=True`)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from cvzoo._optional import require
from cvzoo.backbones.base import Backbone
from cvzoo.backbones.simple_pyramid import SimpleFeaturePyramid
from cvzoo.types import FeatureInfo

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)

# timm modules whose models are plain (single-stride) vision transformers
_PLAIN_VIT_MODULES = ("vision_transformer", "vision_transformer_relpos", "deit", "eva", "beit")


class TimmBackbone(Backbone):
    """timm model -> feature pyramid. (B, in_chans, H, W) -> [(B, C_i, H / s_i, W / s_i)].

    `out_indices` are timm's feature indices (negative counts from the deepest; the default takes the
    three deepest levels, strides 8/16/32 for ResNet, ConvNeXt, EfficientNet, RegNet, MobileNetV3).

    Plain ViTs (ViT, DeiT, EVA, BEiT) have a single stride (the patch size, e.g. 16). For them the
    last requested block's map is turned into `vit_strides` (default 8, 16, 32) by ViTDet's simple
    feature pyramid (transposed convs up, max-pool down), `dynamic_img_size=True` is set so any
    input size divisible by the patch size works, and `signature.size_divisor` is the patch size.
    `pretrained=True` loads timm's weights; `pretrained_cfg_overlay=dict(file=PATH)` loads a local file.
    """

    def __init__(
        self,
        name: str,
        out_indices: Sequence[int] = (-3, -2, -1),
        pretrained: bool = False,
        in_chans: int = 3,
        frozen_stages: int = -1,
        grad_checkpointing: bool = False,
        vit_strides: Sequence[int] = (8, 16, 32),
        **kwargs,
    ) -> None:
        super().__init__()
        timm = require("timm", "timm", "TimmBackbone")
        if not timm.is_model(name):
            close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:8]
            raise ValueError(f"name {name!r} is not a timm model; similar names: {close}")
        if in_chans < 1:
            raise ValueError(f"in_chans must be positive, got {in_chans}")
        plain_vit = timm.models.is_model_in_modules(timm.models.get_arch_name(name), _PLAIN_VIT_MODULES)
        if plain_vit:
            kwargs.setdefault("dynamic_img_size", True)
            out_indices = tuple(out_indices)[-1:]  # the pyramid is built from the last requested block
        self.name = name
        self.model = timm.create_model(
            name, features_only=True, out_indices=tuple(out_indices), pretrained=pretrained, in_chans=in_chans,
            **kwargs,
        )
        channels = self.model.feature_info.channels()
        strides = self.model.feature_info.reduction()
        self.pyramid: SimpleFeaturePyramid | None = None
        size_divisor = 1
        # one repeated stride is a plain ViT's (every block at the patch size), unless the trunk is dilated
        if plain_vit or (len(set(strides)) < len(strides) and kwargs.get("output_stride") is None):
            patch = strides[-1]
            self.pyramid = SimpleFeaturePyramid(channels[-1], patch, vit_strides)
            channels, strides = self.pyramid.channels, list(vit_strides)
            size_divisor = 1 if kwargs.get("dynamic_img_pad") else patch
        mean = tuple(self.model.pretrained_cfg.get("mean", (0.485, 0.456, 0.406)))
        std = tuple(self.model.pretrained_cfg.get("std", (0.229, 0.224, 0.225)))
        if len(mean) != in_chans:  # timm's cfg describes RGB; other channel counts get neutral statistics
            mean, std = (0.5,) * in_chans, (0.5,) * in_chans
        self._declare([FeatureInfo(c, s) for c, s in zip(channels, strides)], in_chans, size_divisor, mean, std)
        self.set_grad_checkpointing(grad_checkpointing)
        self.freeze_stages(frozen_stages)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        target = self.model if hasattr(self.model, "set_grad_checkpointing") else self.model.model
        target.set_grad_checkpointing(enable)

    def frozen_stage_modules(self) -> list[nn.Module]:
        """[stem, level 0, level 1, ...] over all of timm's feature levels (not only the returned ones).

        Modules are taken in registration order, which is execution order for timm's feature models:
        level k holds everything after level k-1's subtree up to the end of its own, so blocks between
        two feature levels (e.g. EfficientNet's unreturned stages) freeze with the later level; the stem
        is everything before level 0 (for ViTs: patch embedding, class token, position embedding).
        """
        named = list(self.model.named_modules())
        names = [n for n, _ in named]
        bounds = []  # (first, last) position of each level's subtree
        for entry in self.model.feature_info.info:
            prefix = next((p for p in (entry["module"], entry["module"].replace(".", "_"),
                                       "model." + entry["module"]) if p in names), None)
            if prefix is None:  # timm did not build levels past the deepest requested one
                break
            inside = [i for i, n in enumerate(names) if n == prefix or n.startswith(prefix + ".")]
            bounds.append((inside[0], inside[-1]))
        groups: list[list[nn.Module]] = [[] for _ in range(len(bounds) + 1)]
        direct: list[list[nn.Parameter]] = [[] for _ in range(len(bounds) + 1)]
        norm_prefix = None
        for i, (name, module) in enumerate(named):
            if norm_prefix is not None and name.startswith(norm_prefix):
                continue  # inside a norm layer taken whole (timm's BatchNormAct2d holds act/drop children)
            g = 0 if i < bounds[0][0] else next((k + 1 for k, (_, last) in enumerate(bounds) if i <= last), None)
            if g is None:  # after the deepest level: never frozen
                continue
            if isinstance(module, _NORMS):  # whole, so train() can keep it in eval mode
                groups[g].append(module)
                norm_prefix = name + "."
            elif next(module.children(), None) is None:
                groups[g].append(module)
            else:  # a container's own parameters (a ViT's cls_token, pos_embed), not its children's
                direct[g].extend(module.parameters(recurse=False))
        return [nn.ModuleList([*m, nn.ParameterList(p)]) for m, p in zip(groups, direct)]

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = self.model(x)
        if self.pyramid is not None:
            return self.pyramid(feats[-1])
        return list(feats)

