"""Necks: list of feature maps -> list of feature maps, built from the incoming `feature_info`."""

from cvzoo.necks.bifpn import BiFPN, BiFPNLayer, WeightedFusion
from cvzoo.necks.compose import BackboneWithNeck
from cvzoo.necks.fpn import FPN, ExtraLevels
from cvzoo.necks.pan import PAN

__all__ = ["FPN", "PAN", "BackboneWithNeck", "BiFPN", "BiFPNLayer", "ExtraLevels", "WeightedFusion"]
