"""Named builders: the one table behind hubconf.py and the `cvzoo` command.

Every builder is a small function that calls constructors; keyword arguments pass through to the
part they name (e.g. `num_classes`, `out_channels`, `pretrained`, `frozen_stages`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from cvzoo.backbones import (
    TimmBackbone,
    TorchvisionBackbone,
    convnext_atto,
    convnext_micro,
    convnext_tiny,
    resnet18,
    resnet34,
    resnet50,
    resnet_micro,
)
from cvzoo.classification import ImageClassifier, ImageRegressor, MultiTaskModel
from cvzoo.classification.baselines import NoopClassifier, NoopMultiTask, NoopRegressor
from cvzoo.detection import ATSS, FCOS, CenterNet, FasterRCNN, KeypointRCNN, MaskRCNN, RetinaNet
from cvzoo.detection.baselines import NoopDetector
from cvzoo.heads import (
    ATSSHead,
    CenterNetHead,
    ClassificationHead,
    FCOSHead,
    KeypointRegressionHead,
    MultiTaskHead,
    RegressionHead,
    RetinaHead,
)
from cvzoo.necks import FPN, PAN, BackboneWithNeck, BiFPN

TASKS = ("backbone", "features", "classification", "regression", "multitask", "detection", "segmentation",
         "generation", "self_supervised", "few_shot", "debiasing", "zero_shot", "implicit")


@dataclass(frozen=True)
class ZooEntry:
    name: str
    builder: Callable[..., nn.Module]
    task: str  # one of TASKS: "features" are backbone + neck pyramids
    extra: str | None = None  # the pip extra it needs beyond the core install
    # `cvzoo train` settings this model needs unless the user sets them (a GAN's lr, a diffusion model's steps)
    train_defaults: Mapping[str, Any] = field(default_factory=dict)

    @property
    def description(self) -> str:
        return (self.builder.__doc__ or "").strip().splitlines()[0]

    def __call__(self, **kwargs) -> nn.Module:
        return self.builder(**kwargs)


# ---- backbones built on timm and torchvision -------------------------------------------------------

def timm_resnet18(pretrained: bool = False, **kwargs) -> TimmBackbone:
    """timm ResNet-18 features at strides 8/16/32 (timm's weights with pretrained=True)."""
    return TimmBackbone("resnet18", pretrained=pretrained, **kwargs)


def timm_convnext_atto(pretrained: bool = False, **kwargs) -> TimmBackbone:
    """timm ConvNeXt-Atto features at strides 8/16/32."""
    return TimmBackbone("convnext_atto", pretrained=pretrained, **kwargs)


def timm_efficientnet_b0(pretrained: bool = False, **kwargs) -> TimmBackbone:
    """timm EfficientNet-B0 features at strides 8/16/32."""
    return TimmBackbone("efficientnet_b0", pretrained=pretrained, **kwargs)


def timm_vit_tiny(pretrained: bool = False, **kwargs) -> TimmBackbone:
    """timm ViT-Ti/16 with a simple feature pyramid (strides 8/16/32 from its stride-16 map)."""
    return TimmBackbone("vit_tiny_patch16_224", pretrained=pretrained, **kwargs)


def tv_resnet50(weights: str | None = None, **kwargs) -> TorchvisionBackbone:
    """torchvision ResNet-50 trunk at strides 8/16/32 (FrozenBatchNorm when weights are given)."""
    return TorchvisionBackbone("resnet50", weights=weights, **kwargs)


def tv_mobilenet_v3_large(weights: str | None = None, **kwargs) -> TorchvisionBackbone:
    """torchvision MobileNetV3-Large trunk at strides 8/16/32."""
    return TorchvisionBackbone("mobilenet_v3_large", weights=weights, **kwargs)


# ---- backbone + neck pyramids -------------------------------------------------------------------------

def resnet_micro_fpn(pretrained: bool = False, out_channels: int = 64, **kwargs) -> BackboneWithNeck:
    """ResNet-micro + FPN, P3-P7 (64 channels): the CPU-sized detector trunk."""
    backbone = resnet_micro(pretrained=pretrained)
    return BackboneWithNeck(backbone, FPN(backbone.feature_info, out_channels, extra_levels=2, **kwargs))


def resnet_micro_pan(pretrained: bool = False, out_channels: int = 64, **kwargs) -> BackboneWithNeck:
    """ResNet-micro + PAN (FPN then bottom-up path), P3-P5 (64 channels)."""
    backbone = resnet_micro(pretrained=pretrained)
    return BackboneWithNeck(backbone, PAN(backbone.feature_info, out_channels, **kwargs))


def resnet_micro_bifpn(pretrained: bool = False, out_channels: int = 32, **kwargs) -> BackboneWithNeck:
    """ResNet-micro + BiFPN (2 repeats), P3-P7 (32 channels)."""
    backbone = resnet_micro(pretrained=pretrained)
    kwargs.setdefault("num_repeats", 2)
    return BackboneWithNeck(backbone, BiFPN(backbone.feature_info, out_channels, **kwargs))


def convnext_micro_fpn(pretrained: bool = False, out_channels: int = 64, **kwargs) -> BackboneWithNeck:
    """ConvNeXt-micro + FPN, P3-P7 (64 channels)."""
    backbone = convnext_micro(pretrained=pretrained)
    return BackboneWithNeck(backbone, FPN(backbone.feature_info, out_channels, extra_levels=2, **kwargs))


def resnet18_fpn(pretrained: bool = False, out_channels: int = 256, **kwargs) -> BackboneWithNeck:
    """ResNet-18 + FPN, P3-P7 (256 channels, P6/P7 from P5 as RetinaNet/FCOS)."""
    backbone = resnet18(pretrained=pretrained)
    return BackboneWithNeck(backbone, FPN(backbone.feature_info, out_channels, extra_levels=2, **kwargs))


def resnet50_fpn(pretrained: bool = False, out_channels: int = 256, **kwargs) -> BackboneWithNeck:
    """ResNet-50 + FPN, P3-P7 (256 channels), the trunk of torchvision's RetinaNet/FCOS."""
    backbone = resnet50(pretrained=pretrained)
    return BackboneWithNeck(backbone, FPN(backbone.feature_info, out_channels, extra_levels=2, **kwargs))


# ---- image-level task models --------------------------------------------------------------------------

def _classifier(backbone: nn.Module, num_classes: int, **head_kwargs) -> ImageClassifier:
    head = ClassificationHead(backbone.feature_info[-1].channels, num_classes, **head_kwargs)
    return ImageClassifier(backbone, head)


def resnet_micro_classifier(num_classes: int = 10, pretrained: bool = False, **kwargs) -> ImageClassifier:
    """ResNet-micro image classifier (0.3M parameters), for CPU training demos."""
    return _classifier(resnet_micro(pretrained=pretrained, out_indices=(3,)), num_classes, **kwargs)


def convnext_micro_classifier(num_classes: int = 10, pretrained: bool = False, **kwargs) -> ImageClassifier:
    """ConvNeXt-micro image classifier (0.2M parameters)."""
    return _classifier(convnext_micro(pretrained=pretrained, out_indices=(3,)), num_classes, **kwargs)


def resnet18_classifier(num_classes: int = 1000, pretrained: bool = False, **kwargs) -> ImageClassifier:
    """ResNet-18 image classifier (torchvision's ImageNet trunk weights with pretrained=True)."""
    return _classifier(resnet18(pretrained=pretrained, out_indices=(3,)), num_classes, **kwargs)


def resnet50_classifier(num_classes: int = 1000, pretrained: bool = False, **kwargs) -> ImageClassifier:
    """ResNet-50 image classifier (torchvision's ImageNet trunk weights with pretrained=True)."""
    return _classifier(resnet50(pretrained=pretrained, out_indices=(3,)), num_classes, **kwargs)


def convnext_atto_classifier(num_classes: int = 1000, pretrained: bool = False, **kwargs) -> ImageClassifier:
    """ConvNeXt-Atto image classifier (timm's ImageNet trunk weights with pretrained=True)."""
    return _classifier(convnext_atto(pretrained=pretrained, out_indices=(3,)), num_classes, **kwargs)


def resnet_micro_regressor(num_outputs: int = 1, value_range: tuple[float, float] | None = (0.0, 1.0),
                           pretrained: bool = False) -> ImageRegressor:
    """ResNet-micro image regressor: per-image values (a price), bounded to value_range."""
    backbone = resnet_micro(pretrained=pretrained, out_indices=(3,))
    return ImageRegressor(backbone, RegressionHead(backbone.feature_info[-1].channels, num_outputs,
                                                   value_range=value_range))


def noop_classifier(num_classes: int = 10, in_channels: int = 3) -> NoopClassifier:
    """Baseline that ignores the image: predicts the learnt class prior."""
    return NoopClassifier(num_classes, in_channels)


def noop_regressor(num_outputs: int = 1, in_channels: int = 3) -> NoopRegressor:
    """Baseline that ignores the image: predicts the learnt mean value."""
    return NoopRegressor(num_outputs, in_channels)


def noop_multitask(num_classes: int = 4, num_keypoints: int = 4, in_channels: int = 3) -> NoopMultiTask:
    """Baseline that ignores the image: class prior, mean value and mean keypoints."""
    return NoopMultiTask(num_classes, num_keypoints, in_channels)


def noop_detector(num_classes: int = 4, in_channels: int = 3) -> NoopDetector:
    """Baseline that ignores the image: one mean box per class, scored by how often the class appears."""
    return NoopDetector(num_classes, in_channels)


def _multitask(backbone: nn.Module, num_classes: int, num_keypoints: int, value_range: tuple[float, float],
               keypoint_hidden: int, loss_weights: dict[str, float] | None) -> MultiTaskModel:
    c = backbone.feature_info[-1].channels
    head = MultiTaskHead({
        "label": ClassificationHead(c, num_classes),
        "value": RegressionHead(c, 1, value_range=value_range),
        "keypoints": KeypointRegressionHead(c, num_keypoints, hidden=keypoint_hidden),
    })
    return MultiTaskModel(backbone, head, loss_weights=loss_weights)


def resnet_micro_multitask(num_classes: int = 4, num_keypoints: int = 4, value_range: tuple[float, float] = (0.0, 1.0),
                           pretrained: bool = False, loss_weights: dict[str, float] | None = None) -> MultiTaskModel:
    """ResNet-micro with three heads: class, a bounded scalar value (a price) and keypoints (corners)."""
    backbone = resnet_micro(pretrained=pretrained, out_indices=(3,))
    return _multitask(backbone, num_classes, num_keypoints, value_range, 64, loss_weights)


def resnet18_multitask(num_classes: int = 4, num_keypoints: int = 4, value_range: tuple[float, float] = (0.0, 1.0),
                       pretrained: bool = False, loss_weights: dict[str, float] | None = None) -> MultiTaskModel:
    """ResNet-18 with three heads: class, a bounded scalar value (a price) and keypoints (corners)."""
    backbone = resnet18(pretrained=pretrained, out_indices=(3,))
    return _multitask(backbone, num_classes, num_keypoints, value_range, 256, loss_weights)


# ---- dense detectors ----------------------------------------------------------------------------------

def _trunk(size: str, pretrained, channels: int | None) -> tuple[nn.Module, FPN]:
    """(backbone, P3-P7 FPN) for "micro" (64 channels), "resnet18" and "resnet50" (256 channels)."""
    backbone = {"micro": resnet_micro, "resnet18": resnet18, "resnet50": resnet50}[size](pretrained=pretrained)
    channels = channels or (64 if size == "micro" else 256)
    return backbone, FPN(backbone.feature_info, channels, extra_levels=2)


def _retinanet(size: str, num_classes: int, pretrained, out_channels: int | None, num_convs: int,
               **kwargs) -> RetinaNet:
    backbone, neck = _trunk(size, pretrained, out_channels)
    head = RetinaHead(neck.feature_info[0].channels, num_classes, 9, num_convs)
    return RetinaNet(backbone, neck, head, **kwargs)


def _fcos(size: str, num_classes: int, pretrained, out_channels: int | None, num_convs: int, **kwargs) -> FCOS:
    backbone, neck = _trunk(size, pretrained, out_channels)
    head = FCOSHead(neck.feature_info[0].channels, num_classes, len(neck.feature_info), num_convs)
    return FCOS(backbone, neck, head, **kwargs)


def _atss(size: str, num_classes: int, pretrained, out_channels: int | None, num_convs: int, **kwargs) -> ATSS:
    backbone, neck = _trunk(size, pretrained, out_channels)
    head = ATSSHead(neck.feature_info[0].channels, num_classes, len(neck.feature_info), num_convs=num_convs)
    return ATSS(backbone, neck, head, **kwargs)


def retinanet_micro(num_classes: int = 4, pretrained: bool = False, out_channels: int | None = None,
                    **kwargs) -> RetinaNet:
    """RetinaNet on ResNet-micro + FPN P3-P7, 2-conv towers: the CPU demo detector."""
    return _retinanet("micro", num_classes, pretrained, out_channels, 2, **kwargs)


def retinanet_resnet18_fpn(num_classes: int = 80, pretrained: bool = False, out_channels: int | None = None,
                           **kwargs) -> RetinaNet:
    """RetinaNet on ResNet-18 + FPN P3-P7 (256 channels), 4-conv towers."""
    return _retinanet("resnet18", num_classes, pretrained, out_channels, 4, **kwargs)


def retinanet_resnet50_fpn(num_classes: int = 80, pretrained: bool = False, out_channels: int | None = None,
                           **kwargs) -> RetinaNet:
    """RetinaNet on ResNet-50 + FPN P3-P7, torchvision's retinanet_resnet50_fpn layout."""
    return _retinanet("resnet50", num_classes, pretrained, out_channels, 4, **kwargs)


def fcos_micro(num_classes: int = 4, pretrained: bool = False, out_channels: int | None = None,
               **kwargs) -> FCOS:
    """FCOS on ResNet-micro + FPN P3-P7, 2-conv towers: anchor-free CPU demo detector."""
    return _fcos("micro", num_classes, pretrained, out_channels, 2, **kwargs)


def fcos_resnet18_fpn(num_classes: int = 80, pretrained: bool = False, out_channels: int | None = None,
                      **kwargs) -> FCOS:
    """FCOS on ResNet-18 + FPN P3-P7 (256 channels), GroupNorm towers."""
    return _fcos("resnet18", num_classes, pretrained, out_channels, 4, **kwargs)


def fcos_resnet50_fpn(num_classes: int = 80, pretrained: bool = False, out_channels: int | None = None,
                      **kwargs) -> FCOS:
    """FCOS on ResNet-50 + FPN P3-P7, torchvision's fcos_resnet50_fpn layout."""
    return _fcos("resnet50", num_classes, pretrained, out_channels, 4, **kwargs)


def atss_micro(num_classes: int = 4, pretrained: bool = False, out_channels: int | None = None,
               **kwargs) -> ATSS:
    """ATSS on ResNet-micro + FPN P3-P7, 2-conv towers."""
    return _atss("micro", num_classes, pretrained, out_channels, 2, **kwargs)


def atss_resnet18_fpn(num_classes: int = 80, pretrained: bool = False, out_channels: int | None = None,
                      **kwargs) -> ATSS:
    """ATSS on ResNet-18 + FPN P3-P7 (256 channels)."""
    return _atss("resnet18", num_classes, pretrained, out_channels, 4, **kwargs)


def centernet_micro(num_classes: int = 4, pretrained: bool = False, **kwargs) -> CenterNet:
    """CenterNet on ResNet-micro + FPN, reading its finest level P3 (stride 8)."""
    backbone = resnet_micro(pretrained=pretrained)
    neck = FPN(backbone.feature_info, 64, num_outputs=1)  # only P3 is read
    return CenterNet(backbone, neck, CenterNetHead(64, num_classes, head_channels=32), **kwargs)


def centernet_resnet18(num_classes: int = 80, pretrained: bool = False, **kwargs) -> CenterNet:
    """CenterNet on ResNet-18 from stride 4 (C2-C5 FPN, 128 channels), reading the stride-4 level."""
    backbone = resnet18(pretrained=pretrained, out_indices=(0, 1, 2, 3))
    neck = FPN(backbone.feature_info, 128, num_outputs=1)  # only the stride-4 level is read
    return CenterNet(backbone, neck, CenterNetHead(128, num_classes), **kwargs)


# ---- two-stage detectors ------------------------------------------------------------------------------

def _rcnn_trunk(size: str, pretrained) -> tuple[nn.Module, FPN]:
    """(backbone C2-C5, FPN P2-P6 with a max-pooled P6): the R-CNN pyramid, 64 channels for "micro", else 256."""
    backbone = {"micro": resnet_micro, "resnet18": resnet18, "resnet50": resnet50}[size](
        pretrained=pretrained, out_indices=(0, 1, 2, 3))
    return backbone, FPN(backbone.feature_info, 64 if size == "micro" else 256, extra_levels=1, extra_mode="maxpool")


# CPU-demo sizes: fewer proposals and sampled RoIs than torchvision's 2000/1000 and 512
_MICRO_RCNN = {"representation_size": 256, "batch_size_per_image": 64}


def _micro_rpn(neck: FPN):
    from cvzoo.detection.rpn import RegionProposalNetwork, rpn_anchor_generator
    from cvzoo.heads.roi import RPNHead

    strides = tuple(f.stride for f in neck.feature_info)
    return RegionProposalNetwork(RPNHead(neck.feature_info[0].channels), rpn_anchor_generator(strides),
                                 pre_nms_top_n_train=600, post_nms_top_n_train=300, pre_nms_top_n_test=600,
                                 post_nms_top_n_test=300)


def fasterrcnn_micro(num_classes: int = 4, pretrained: bool = False, **kwargs) -> FasterRCNN:
    """Faster R-CNN on ResNet-micro + FPN P2-P6 (64 channels), small RPN/RoI budgets: the CPU demo."""
    backbone, neck = _rcnn_trunk("micro", pretrained)
    return FasterRCNN(backbone, neck, num_classes, rpn=_micro_rpn(neck), **{**_MICRO_RCNN, **kwargs})


def maskrcnn_micro(num_classes: int = 4, pretrained: bool = False, **kwargs) -> MaskRCNN:
    """Mask R-CNN on ResNet-micro + FPN P2-P6 (64 channels), a 2-conv mask head: the CPU demo."""
    from cvzoo.detection.roi_heads import MaskBranch
    from cvzoo.detection.two_stage import roi_pooler
    from cvzoo.heads.roi import MaskHead

    backbone, neck = _rcnn_trunk("micro", pretrained)
    branch = MaskBranch(MaskHead(64, num_classes, layers=(64, 64), dim_reduced=64),
                        roi_pooler(tuple(f.stride for f in neck.feature_info), 14))
    return MaskRCNN(backbone, neck, num_classes, branch, rpn=_micro_rpn(neck), **{**_MICRO_RCNN, **kwargs})


def keypointrcnn_micro(num_classes: int = 4, num_keypoints: int = 4, pretrained: bool = False,
                       **kwargs) -> KeypointRCNN:
    """Keypoint R-CNN on ResNet-micro + FPN P2-P6 (64 channels), a 4-conv keypoint head: the CPU demo."""
    from cvzoo.detection.roi_heads import KeypointBranch
    from cvzoo.detection.two_stage import roi_pooler
    from cvzoo.heads.roi import KeypointHead

    backbone, neck = _rcnn_trunk("micro", pretrained)
    branch = KeypointBranch(KeypointHead(64, num_keypoints, layers=(64,) * 4),
                            roi_pooler(tuple(f.stride for f in neck.feature_info), 14))
    return KeypointRCNN(backbone, neck, num_classes, num_keypoints, branch, rpn=_micro_rpn(neck),
                        **{**_MICRO_RCNN, **kwargs})


def fasterrcnn_resnet18_fpn(num_classes: int = 80, pretrained: bool = False, **kwargs) -> FasterRCNN:
    """Faster R-CNN on ResNet-18 + FPN P2-P6 (256 channels), torchvision's RPN and box head settings."""
    backbone, neck = _rcnn_trunk("resnet18", pretrained)
    return FasterRCNN(backbone, neck, num_classes, **kwargs)


def fasterrcnn_resnet50_fpn(num_classes: int = 80, pretrained: bool = False, **kwargs) -> FasterRCNN:
    """Faster R-CNN on ResNet-50 + FPN P2-P6, torchvision's fasterrcnn_resnet50_fpn layout."""
    backbone, neck = _rcnn_trunk("resnet50", pretrained)
    return FasterRCNN(backbone, neck, num_classes, **kwargs)


def maskrcnn_resnet50_fpn(num_classes: int = 80, pretrained: bool = False, **kwargs) -> MaskRCNN:
    """Mask R-CNN on ResNet-50 + FPN P2-P6, torchvision's maskrcnn_resnet50_fpn layout."""
    backbone, neck = _rcnn_trunk("resnet50", pretrained)
    return MaskRCNN(backbone, neck, num_classes, **kwargs)


def keypointrcnn_resnet50_fpn(num_classes: int = 1, num_keypoints: int = 17, pretrained: bool = False,
                              **kwargs) -> KeypointRCNN:
    """Keypoint R-CNN on ResNet-50 + FPN P2-P6 (person, 17 COCO keypoints), torchvision's layout."""
    backbone, neck = _rcnn_trunk("resnet50", pretrained)
    return KeypointRCNN(backbone, neck, num_classes, num_keypoints, **kwargs)


# ---- semantic segmentation ----------------------------------------------------------------------------

def deeplabv3_resnet_tiny(num_classes: int = 5, pretrained: bool = False, **kwargs):
    """DeepLabV3 on ResNet-micro at output stride 8 (dilated), a 64-channel ASPP and an FCN auxiliary head."""
    from cvzoo.heads import ASPPHead, FCNHead
    from cvzoo.segmentation import Segmenter

    backbone = resnet_micro(pretrained=pretrained, out_indices=(2, 3), output_stride=8)
    head = ASPPHead(backbone.feature_info[-1].channels, num_classes, atrous_rates=(3, 6, 9), channels=64)
    return Segmenter(backbone, head, aux_head=FCNHead(backbone.feature_info[0].channels, num_classes, in_index=0),
                     **kwargs)


def unet_resnet_micro(num_classes: int = 5, pretrained: bool = False, **kwargs):
    """U-Net decoder over the four ResNet-micro stages (strides 4-32), logits at stride 4."""
    from cvzoo.heads import UNetDecoder
    from cvzoo.segmentation import Segmenter

    backbone = resnet_micro(pretrained=pretrained, out_indices=(0, 1, 2, 3))
    return Segmenter(backbone, UNetDecoder(backbone.feature_info, num_classes), **kwargs)


def fpnseg_resnet_micro(num_classes: int = 5, pretrained: bool = False, **kwargs):
    """Panoptic-FPN semantic branch on ResNet-micro + FPN P2-P5 (64 channels), logits at stride 4."""
    from cvzoo.heads import FPNSegHead
    from cvzoo.segmentation import Segmenter

    backbone = resnet_micro(pretrained=pretrained, out_indices=(0, 1, 2, 3))
    neck = FPN(backbone.feature_info, 64)
    return Segmenter(backbone, FPNSegHead(neck.feature_info, num_classes, 64), neck=neck, **kwargs)


def fcn_resnet50(num_classes: int = 21, pretrained: bool = False, aux: bool = True, **kwargs):
    """FCN on ResNet-50 at output stride 8, torchvision's fcn_resnet50 layout (auxiliary FCN head on layer3)."""
    from cvzoo.heads import FCNHead
    from cvzoo.segmentation import Segmenter

    backbone = resnet50(pretrained=pretrained, out_indices=(2, 3), output_stride=8)
    return Segmenter(backbone, FCNHead(2048, num_classes), aux_head=FCNHead(1024, num_classes, in_index=0) if aux
                     else None, **kwargs)


def deeplabv3_resnet50(num_classes: int = 21, pretrained: bool = False, aux: bool = True, **kwargs):
    """DeepLabV3 on ResNet-50 at output stride 8, torchvision's deeplabv3_resnet50 layout (auxiliary FCN head)."""
    from cvzoo.heads import ASPPHead, FCNHead
    from cvzoo.segmentation import Segmenter

    backbone = resnet50(pretrained=pretrained, out_indices=(2, 3), output_stride=8)
    return Segmenter(backbone, ASPPHead(2048, num_classes), aux_head=FCNHead(1024, num_classes, in_index=0) if aux
                     else None, **kwargs)


def lraspp_mobilenet_v3_large(num_classes: int = 21, weights: str | None = None, **kwargs):
    """LR-ASPP on a dilated torchvision MobileNetV3-Large (strides 8 and 16), torchvision's layout."""
    from cvzoo.backbones import TorchvisionBackbone
    from cvzoo.heads import LRASPPHead
    from cvzoo.segmentation import Segmenter

    backbone = TorchvisionBackbone("mobilenet_v3_large", return_layers=("features.4", "features.16"), weights=weights,
                                   dilated=True)
    low, high = backbone.feature_info
    return Segmenter(backbone, LRASPPHead(low.channels, high.channels, num_classes), **kwargs)


def noop_segmenter(num_classes: int = 5, in_channels: int = 3, **kwargs):
    """Image-blind baseline: the majority class at every pixel (the learnt pixel class prior)."""
    from cvzoo.segmentation import NoopSegmenter

    return NoopSegmenter(num_classes, in_channels, **kwargs)


# ---- generative models (digits: 16 x 16 grey images) ------------------------------------------------------

def noop_generator(num_classes: int | None = None, in_channels: int = 1, image_size: int = 16):
    """Structure-blind baseline: independent Gaussian pixels (per class with num_classes)."""
    from cvzoo.generative.baselines import PixelGaussian

    return PixelGaussian(image_size=image_size, in_channels=in_channels, num_classes=num_classes)


def autoencoder_digits(in_channels: int = 1, image_size: int = 16, latent_dim: int = 32, **kwargs):
    """Convolutional autoencoder (MSE) for 16 px digits; its ConvEncoder is a backbone."""
    from cvzoo.generative import AutoEncoder

    return AutoEncoder(image_size=image_size, in_channels=in_channels, latent_dim=latent_dim, widths=(32, 64),
                       **kwargs)


def vae_digits(in_channels: int = 1, image_size: int = 16, latent_dim: int = 16, **kwargs):
    """VAE with a learnt-variance Gaussian likelihood for 16 px digits (ELBO in nats)."""
    from cvzoo.generative import VAE

    kwargs.setdefault("likelihood", "gaussian")
    return VAE(image_size=image_size, in_channels=in_channels, latent_dim=latent_dim, widths=(32, 64), **kwargs)


def vqvae_digits(in_channels: int = 1, image_size: int = 16, **kwargs):
    """VQ-VAE (64 EMA codes on a 4 x 4 grid, dead-code restarts) for 16 px digits."""
    from cvzoo.generative import VQVAE

    kwargs.setdefault("dead_code_threshold", 0.5)
    return VQVAE(image_size=image_size, in_channels=in_channels, num_codes=64, code_dim=16, widths=(32, 64),
                 **kwargs)


def _dcgan(num_classes: int | None, in_channels: int, image_size: int, **kwargs):
    from cvzoo.generative import GAN, DCGANDiscriminator, DCGANGenerator

    generator = DCGANGenerator(latent_dim=64, image_size=image_size, out_channels=in_channels, base_channels=32,
                               num_classes=num_classes)
    discriminator = DCGANDiscriminator(image_size=image_size, in_channels=in_channels, base_channels=32,
                                       num_classes=num_classes)
    return GAN(generator, discriminator, **kwargs)


def dcgan_digits(in_channels: int = 1, image_size: int = 16, **kwargs):
    """DCGAN (non-saturating loss) for 16 px digits, trained by alternating optimizers."""
    return _dcgan(None, in_channels, image_size, **kwargs)


def cdcgan_digits(num_classes: int = 10, in_channels: int = 1, image_size: int = 16, **kwargs):
    """Class-conditional DCGAN: class embedding in the generator, projection discriminator."""
    return _dcgan(num_classes, in_channels, image_size, **kwargs)


def ddpm_digits(num_classes: int | None = 10, in_channels: int = 1, image_size: int = 16, **kwargs):
    """Class-conditional DDPM (own UNet, cosine schedule, T=500) with classifier-free guidance."""
    from cvzoo.generative import GaussianDiffusion, UNet

    unet = UNet(in_channels=in_channels, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
                num_classes=num_classes)
    kwargs.setdefault("num_timesteps", 500)
    kwargs.setdefault("schedule", "cosine")
    return GaussianDiffusion(unet, image_size=image_size, **kwargs)


def ddpm_unet2d_digits(num_classes: int | None = 10, in_channels: int = 1, image_size: int = 16, **kwargs):
    """The same DDPM with diffusers' UNet2DModel as the denoiser."""
    from cvzoo.generative import GaussianDiffusion, diffusers_unet2d

    unet = diffusers_unet2d(image_size, in_channels, num_classes=num_classes, block_out_channels=(32, 64))
    kwargs.setdefault("num_timesteps", 500)
    kwargs.setdefault("schedule", "cosine")
    return GaussianDiffusion(unet, image_size=image_size, **kwargs)


def ncsn_digits(in_channels: int = 1, image_size: int = 16, **kwargs):
    """Noise-conditional score network (10 noise levels, 1 to 0.01), annealed Langevin sampling."""
    from cvzoo.generative import NCSN, ScoreNetwork

    return NCSN(ScoreNetwork(in_channels=in_channels, base_channels=32, channel_mults=(1, 2)),
                image_size=image_size, **kwargs)


# ---- self-supervised pre-training (any classification set; the labels are only used to evaluate) ----------

def _ssl_backbone(in_channels: int, pretrained: bool):
    return resnet_micro(pretrained=pretrained, in_channels=in_channels, out_indices=(3,))


def simclr_resnet_micro(in_channels: int = 3, pretrained: bool = False, **kwargs):
    """SimCLR (NT-Xent, 64-d projection) on ResNet-micro; views built on the device."""
    from cvzoo.ssl import SimCLR

    return SimCLR(_ssl_backbone(in_channels, pretrained), projection_dim=64, hidden_dim=256, **kwargs)


def moco_resnet_micro(in_channels: int = 3, pretrained: bool = False, **kwargs):
    """MoCo v2 (momentum encoder, 4,096-key queue) on ResNet-micro."""
    from cvzoo.ssl import MoCo

    return MoCo(_ssl_backbone(in_channels, pretrained), version=2, projection_dim=64, hidden_dim=256, **kwargs)


def byol_resnet_micro(in_channels: int = 3, pretrained: bool = False, **kwargs):
    """BYOL (predictor, momentum target) on ResNet-micro."""
    from cvzoo.ssl import BYOL

    return BYOL(_ssl_backbone(in_channels, pretrained), projection_dim=64, hidden_dim=256, **kwargs)


def simsiam_resnet_micro(in_channels: int = 3, pretrained: bool = False, **kwargs):
    """SimSiam (predictor, stop-gradient) on ResNet-micro."""
    from cvzoo.ssl import SimSiam

    return SimSiam(_ssl_backbone(in_channels, pretrained), projection_dim=128, hidden_dim=256,
                   prediction_hidden_dim=64, **kwargs)


def barlow_twins_resnet_micro(in_channels: int = 3, pretrained: bool = False, **kwargs):
    """Barlow Twins (256-d expander, lambda 1/256) on ResNet-micro."""
    from cvzoo.ssl import BarlowTwins

    kwargs.setdefault("lambd", 1 / 256)
    return BarlowTwins(_ssl_backbone(in_channels, pretrained), projection_dim=256, hidden_dim=256, **kwargs)


def vicreg_resnet_micro(in_channels: int = 3, pretrained: bool = False, **kwargs):
    """VICReg (256-d expander) on ResNet-micro."""
    from cvzoo.ssl import VICReg

    return VICReg(_ssl_backbone(in_channels, pretrained), projection_dim=256, hidden_dim=256, **kwargs)


def dino_resnet_micro(in_channels: int = 3, pretrained: bool = False, **kwargs):
    """DINO (2 global + 4 local crops, 256 prototypes) on ResNet-micro."""
    from cvzoo.ssl import DINO

    return DINO(_ssl_backbone(in_channels, pretrained), out_dim=256, hidden_dim=256, bottleneck_dim=64, **kwargs)


def hyper_classifier(num_classes: int = 10, in_channels: int = 3, **params) -> ImageClassifier:
    """Searchable classifier (`cvzoo tune`): any point of `cvzoo.hyper.classifier_space`, ResNet-micro by default."""
    from cvzoo.hyper import hyper_classifier as build

    return build(num_classes=num_classes, in_channels=in_channels, **params)


# ---- few-shot, debiasing (cvzoo.adapt) -------------------------------------------------------------------

def protonet_resnet_micro(in_channels: int = 3, n_way: int = 5, k_shot: int = 5, query: int = 5,
                          pretrained: bool = False, **kwargs):
    """Prototypical network on ResNet-micro's stride-8 map, flattened; 5-way 5-shot training episodes."""
    from cvzoo.adapt import ProtoNet

    kwargs.setdefault("pool", "flatten")
    backbone = resnet_micro(pretrained=pretrained, in_channels=in_channels, out_indices=(1,))
    return ProtoNet(backbone, n_way=n_way, k_shot=k_shot, query=query, **kwargs)


def _few_shot_classifier(in_channels: int, n_way: int, pretrained: bool) -> ImageClassifier:
    backbone = _ssl_backbone(in_channels, pretrained)
    return ImageClassifier(backbone, ClassificationHead(backbone.feature_info[-1].channels, n_way))


def maml_resnet_micro(in_channels: int = 3, n_way: int = 5, k_shot: int = 5, query: int = 5,
                      pretrained: bool = False, **kwargs):
    """MAML (second order, 1 inner step of 0.4) on a ResNet-micro 5-way classifier, 5-shot episodes."""
    from cvzoo.adapt import MAML

    kwargs.setdefault("eval_inner_steps", 5)
    return MAML(_few_shot_classifier(in_channels, n_way, pretrained), n_way=n_way, k_shot=k_shot, query=query,
                **kwargs)


def anil_resnet_micro(in_channels: int = 3, n_way: int = 5, k_shot: int = 5, query: int = 5,
                      pretrained: bool = False, **kwargs):
    """ANIL (MAML adapting the head only, 5 inner steps) on a ResNet-micro 5-way classifier."""
    from cvzoo.adapt import MAML

    kwargs.setdefault("inner_steps", 5)
    kwargs.setdefault("eval_inner_steps", 10)
    return MAML(_few_shot_classifier(in_channels, n_way, pretrained), n_way=n_way, k_shot=k_shot, query=query,
                adapt="head", **kwargs)


def dann_resnet_micro(num_classes: int = 10, num_domains: int = 10, in_channels: int = 3, pretrained: bool = False,
                      **kwargs):
    """DANN on ResNet-micro: label head + label-aware colour adversary behind gradient reversal (coefficient 1)."""
    from cvzoo.adapt import DANN

    kwargs.setdefault("adversary_target", "colour")
    kwargs.setdefault("adversary_sees_label", True)
    return DANN(_ssl_backbone(in_channels, pretrained), num_classes, num_domains, **kwargs)


def erm_resnet_micro(num_classes: int = 10, num_domains: int = 10, in_channels: int = 3, pretrained: bool = False,
                     **kwargs):
    """The plain model DANN is measured against: the same parts, reversal 0 (the adversary only probes)."""
    kwargs.setdefault("adversary_target", "colour")
    return dann_resnet_micro(num_classes, num_domains, in_channels, pretrained, reversal=0.0, **kwargs)


# ---- zero-shot: a tiny CLIP trained from scratch on captions ---------------------------------------------------

def tiny_clip_resnet_micro(vocabulary: tuple[str, ...] | None = None, text_layers: int = 0, embed_dim: int = 64,
                           pretrained: bool = False, **kwargs):
    """Tiny CLIP: ResNet-micro + a bag-of-words text encoder (words of `shapes-captions` by default)."""
    from cvzoo.data.shape_captions import ShapesCaptions
    from cvzoo.ssl.clip import TinyCLIP, TinyTextEncoder, WordTokenizer

    tokenizer = WordTokenizer(ShapesCaptions.vocabulary_of() if vocabulary is None else vocabulary,
                              context_length=8)
    text = TinyTextEncoder(tokenizer.vocab_size, width=64, layers=text_layers, heads=4, context_length=8,
                           pool="mean", causal=False)
    backbone = resnet_micro(pretrained=pretrained, out_indices=(3,))
    return TinyCLIP(backbone, text, embed_dim=embed_dim, tokenizer=tokenizer, **kwargs)


# ---- neural implicit models (cvzoo.implicit): coordinates or rays in, colours out -----------------------------

def siren_image(height: int = 128, width: int = 128, **kwargs):
    """SIREN image (coordinates -> RGB), 256 wide, 3 hidden sine layers: `cvzoo implicit fit-image`."""
    from cvzoo.implicit import siren_image as build

    return build(height, width, **kwargs)


def nerf_tiny(**kwargs):
    """Tiny NeRF (coarse + fine 64-wide MLPs, 32 + 32 samples a ray): `cvzoo implicit nerf`."""
    from cvzoo.implicit import nerf_tiny as build

    return build(**kwargs)


# episodes are batches (their size is fixed by n_way, k_shot and query); no flips (digits are not symmetric)
_FEW_SHOT_TRAINING = {"augment": "none", "steps": 600, "lr": 1e-3, "weight_decay": 1e-4}
_DEBIASING_TRAINING = {"augment": "none", "steps": 1500, "batch_size": 64, "lr": 2e-3, "weight_decay": 1e-4}
_SSL_TRAINING = {"augment": "none", "batch_size": 128, "steps": 1000, "lr": 2e-3, "weight_decay": 1e-4}


# what a generative model needs from `cvzoo train` beyond the general defaults (no flips: digits are not
# mirror-symmetric; no weight decay on GANs, DCGAN's lr)
_GENERATIVE_TRAINING = {"augment": "none", "weight_decay": 0.0, "batch_size": 64}
_GAN_TRAINING = {**_GENERATIVE_TRAINING, "lr": 2e-4, "steps": 3000, "warmup_steps": 0}
_DIFFUSION_TRAINING = {**_GENERATIVE_TRAINING, "lr": 1e-3, "steps": 4000, "ema_decay": 0.995}


def _entries() -> list[ZooEntry]:
    own_backbones = [resnet_micro, resnet18, resnet34, resnet50, convnext_micro, convnext_atto, convnext_tiny]
    return [
        *(ZooEntry(f.__name__, f, "backbone") for f in own_backbones),
        *(ZooEntry(f.__name__, f, "backbone", "timm")
          for f in (timm_resnet18, timm_convnext_atto, timm_efficientnet_b0, timm_vit_tiny)),
        ZooEntry("tv_resnet50", tv_resnet50, "backbone"),
        ZooEntry("tv_mobilenet_v3_large", tv_mobilenet_v3_large, "backbone"),
        *(ZooEntry(f.__name__, f, "features") for f in (
            resnet_micro_fpn, resnet_micro_pan, resnet_micro_bifpn, convnext_micro_fpn, resnet18_fpn, resnet50_fpn)),
        *(ZooEntry(f.__name__, f, "classification") for f in (
            resnet_micro_classifier, convnext_micro_classifier, resnet18_classifier, resnet50_classifier,
            convnext_atto_classifier)),
        ZooEntry("noop_classifier", noop_classifier, "classification"),
        ZooEntry("hyper_classifier", hyper_classifier, "classification"),
        ZooEntry("resnet_micro_regressor", resnet_micro_regressor, "regression"),
        ZooEntry("noop_regressor", noop_regressor, "regression"),
        ZooEntry("resnet_micro_multitask", resnet_micro_multitask, "multitask"),
        ZooEntry("noop_multitask", noop_multitask, "multitask"),
        ZooEntry("resnet18_multitask", resnet18_multitask, "multitask"),
        *(ZooEntry(f.__name__, f, "detection") for f in (
            retinanet_micro, retinanet_resnet18_fpn, retinanet_resnet50_fpn, fcos_micro, fcos_resnet18_fpn,
            fcos_resnet50_fpn, atss_micro, atss_resnet18_fpn, centernet_micro, centernet_resnet18, noop_detector,
            fasterrcnn_micro, maskrcnn_micro, keypointrcnn_micro, fasterrcnn_resnet18_fpn, fasterrcnn_resnet50_fpn,
            maskrcnn_resnet50_fpn, keypointrcnn_resnet50_fpn)),
        *(ZooEntry(f.__name__, f, "segmentation") for f in (
            deeplabv3_resnet_tiny, unet_resnet_micro, fpnseg_resnet_micro, fcn_resnet50, deeplabv3_resnet50,
            lraspp_mobilenet_v3_large, noop_segmenter)),
        ZooEntry("autoencoder_digits", autoencoder_digits, "generation",
                 train_defaults={**_GENERATIVE_TRAINING, "steps": 1500}),
        ZooEntry("vae_digits", vae_digits, "generation", train_defaults={**_GENERATIVE_TRAINING, "steps": 2000}),
        ZooEntry("vqvae_digits", vqvae_digits, "generation", train_defaults={**_GENERATIVE_TRAINING, "steps": 1500}),
        ZooEntry("dcgan_digits", dcgan_digits, "generation", train_defaults=_GAN_TRAINING),
        ZooEntry("cdcgan_digits", cdcgan_digits, "generation", train_defaults=_GAN_TRAINING),
        ZooEntry("ddpm_digits", ddpm_digits, "generation", train_defaults=_DIFFUSION_TRAINING),
        ZooEntry("ddpm_unet2d_digits", ddpm_unet2d_digits, "generation", "diffusion",
                 train_defaults=_DIFFUSION_TRAINING),
        ZooEntry("ncsn_digits", ncsn_digits, "generation", train_defaults={**_DIFFUSION_TRAINING, "steps": 3000}),
        ZooEntry("noop_generator", noop_generator, "generation",
                 train_defaults={**_GENERATIVE_TRAINING, "lr": 0.05, "steps": 300}),
        *(ZooEntry(f.__name__, f, "self_supervised", "augment", train_defaults=_SSL_TRAINING) for f in (
            simclr_resnet_micro, moco_resnet_micro, byol_resnet_micro, simsiam_resnet_micro,
            barlow_twins_resnet_micro, vicreg_resnet_micro, dino_resnet_micro)),
        ZooEntry("protonet_resnet_micro", protonet_resnet_micro, "few_shot",
                 train_defaults={**_FEW_SHOT_TRAINING, "lr": 3e-4}),
        *(ZooEntry(f.__name__, f, "few_shot", train_defaults=_FEW_SHOT_TRAINING) for f in (
            maml_resnet_micro, anil_resnet_micro)),
        *(ZooEntry(f.__name__, f, "debiasing", train_defaults=_DEBIASING_TRAINING) for f in (
            dann_resnet_micro, erm_resnet_micro)),
        ZooEntry("tiny_clip_resnet_micro", tiny_clip_resnet_micro, "zero_shot",
                 train_defaults={"augment": "none", "steps": 600, "batch_size": 64, "lr": 2e-3, "weight_decay": 1e-4,
                                 "train_images": 4096, "val_images": 400}),
        ZooEntry("siren_image", siren_image, "implicit"),
        ZooEntry("nerf_tiny", nerf_tiny, "implicit"),
    ]


MODELS: dict[str, ZooEntry] = {e.name: e for e in _entries()}


def get_entry(name: str) -> ZooEntry:
    """The zoo entry called `name`; an unknown name raises a ValueError listing the close matches."""
    if name in MODELS:
        return MODELS[name]
    close = difflib.get_close_matches(name, list(MODELS), n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known names: {', '.join(MODELS)}"
    raise ValueError(f"unknown model name {name!r}{hint}")


def create_model(name: str, **kwargs) -> nn.Module:
    """Builds the zoo entry `name` with `kwargs` passed to its builder."""
    return get_entry(name)(**kwargs)


def list_models(task: str | None = None) -> list[str]:
    """Zoo names, optionally only those of one task (see TASKS)."""
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return [n for n, e in MODELS.items() if task is None or e.task == task]


def markdown_table() -> str:
    """The zoo as a Markdown table (the one in README.md)."""
    rows = ["| name | task | needs | description |", "| --- | --- | --- | --- |"]
    rows += [f"| `{e.name}` | {e.task} | {f'cvzoo[{e.extra}]' if e.extra else 'core'} | {e.description} |"
             for e in MODELS.values()]
    return "\n".join(rows)
