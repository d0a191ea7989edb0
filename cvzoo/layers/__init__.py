"""Small shared blocks (torch only)."""

from cvzoo.layers.conv import ActLayer, ConvNormAct, NormLayer, SeparableConvNormAct
from cvzoo.layers.init import init_conv_kaiming_uniform_, init_conv_normal_, prior_probability_bias
from cvzoo.layers.norm import LayerNorm2d

__all__ = [
    "ActLayer",
    "ConvNormAct",
    "LayerNorm2d",
    "NormLayer",
    "SeparableConvNormAct",
    "init_conv_kaiming_uniform_",
    "init_conv_normal_",
    "prior_probability_bias",
]
