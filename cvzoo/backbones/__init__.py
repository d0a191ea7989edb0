"""Backbones: image -> list of feature maps, high resolution first, with declared `feature_info`."""

from cvzoo.backbones.base import Backbone
from cvzoo.backbones.convnext import ConvNeXt, convnext_atto, convnext_micro, convnext_tiny
from cvzoo.backbones.resnet import ResNet, resnet18, resnet34, resnet50, resnet_micro
from cvzoo.backbones.simple_pyramid import SimpleFeaturePyramid
from cvzoo.backbones.timm_backbone import TimmBackbone
from cvzoo.backbones.torchvision_backbone import TorchvisionBackbone
from cvzoo.backbones.weights import load_pretrained, read_state_dict

__all__ = [
    "Backbone",
    "ConvNeXt",
    "ResNet",
    "SimpleFeaturePyramid",
    "TimmBackbone",
    "TorchvisionBackbone",
    "convnext_atto",
    "convnext_micro",
    "convnext_tiny",
    "load_pretrained",
    "read_state_dict",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet_micro",
]
