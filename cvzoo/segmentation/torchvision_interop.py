"""torchvision's FCN, DeepLabV3 and LR-ASPP weights in cvzoo Segmenters.

torchvision's segmentation models take ImageNet-normalised images and upsample their logits to the input
size, as cvzoo's Segmenter does, so the same normalised batch gives the same logits (and the same
auxiliary logits when the model has an auxiliary classifier).
"""

from __future__ import annotations

from torch import nn

from cvzoo.backbones.resnet import ResNet
from cvzoo.heads.segmentation import ASPPHead, FCNHead, LRASPPHead
from cvzoo.segmentation.segmenter import Segmenter


def _resnet_trunk(tv_backbone: nn.Module) -> ResNet:
    """torchvision's dilated ResNet (an IntermediateLayerGetter returning layer3 "aux" and layer4 "out") ->
    cvzoo ResNet with out_indices (2, 3) at the same output stride."""
    layers = tuple(len(getattr(tv_backbone, f"layer{i}")) for i in range(1, 5))
    block = "bottleneck" if hasattr(tv_backbone.layer1[0], "conv3") else "basic"
    # output stride: 4, halved by every stage whose first block still strides
    stride = 4
    for i in range(2, 5):
        first = getattr(tv_backbone, f"layer{i}")[0]
        stride *= (first.conv2 if block == "bottleneck" else first.conv1).stride[0]
    trunk = ResNet(layers=layers, block=block, out_indices=(2, 3), output_stride=stride)
    trunk.load_state_dict(tv_backbone.state_dict())
    return trunk


def _fcn_head(tv_head: nn.Sequential, in_index: int) -> FCNHead:
    head = FCNHead(tv_head[0].in_channels, tv_head[4].out_channels, in_index=in_index, dropout=tv_head[3].p)
    head.load_state_dict(tv_head.state_dict())
    return head


def _aspp_head(tv_head: nn.Sequential) -> ASPPHead:
    aspp = tv_head[0]
    rates = tuple(c[0].dilation[0] for c in aspp.convs[1:-1])
    channels = aspp.project[0].out_channels
    head = ASPPHead(aspp.convs[0][0].in_channels, tv_head[4].out_channels, rates, channels)
    state = {}
    for key, value in tv_head.state_dict().items():
        parts = key.split(".")
        if parts[0] == "0" and parts[1] == "convs":
            i = int(parts[2])
            if i == len(aspp.convs) - 1:  # the pooling branch: (pool, conv, bn, relu) -> ConvNormAct (conv, bn)
                key = f"branches.{i}.conv.{int(parts[3]) - 1}.{'.'.join(parts[4:])}"
            else:
                key = f"branches.{i}.{'.'.join(parts[3:])}"
        elif parts[0] == "0" and parts[1] == "project":
            key = f"project.0.{'.'.join(parts[2:])}"
        else:
            key = {"1": "fuse.0", "2": "fuse.1", "4": "classifier"}[parts[0]] + "." + ".".join(parts[1:])
        state[key] = value
    head.load_state_dict(state)
    return head


def segmenter_from_torchvision(tv_model: nn.Module) -> Segmenter:
    """torchvision `fcn_resnet50` / `fcn_resnet101`, `deeplabv3_resnet50` / `_resnet101` or
    `lraspp_mobilenet_v3_large` -> Segmenter with the same weights."""
    name = type(tv_model).__name__
    if name == "LRASPP":
        return _lraspp_from_torchvision(tv_model)
    if name not in ("FCN", "DeepLabV3") or not hasattr(tv_model.backbone, "layer4"):
        raise ValueError(f"from_torchvision expects torchvision's FCN or DeepLabV3 on a ResNet, or LRASPP, got {name}")
    trunk = _resnet_trunk(tv_model.backbone)
    head = _fcn_head(tv_model.classifier, -1) if name == "FCN" else _aspp_head(tv_model.classifier)
    aux = _fcn_head(tv_model.aux_classifier, 0) if tv_model.aux_classifier is not None else None
    return Segmenter(trunk, head, aux_head=aux)


def _lraspp_from_torchvision(tv_model: nn.Module) -> Segmenter:
    from cvzoo.backbones.torchvision_backbone import TorchvisionBackbone

    tv_backbone = tv_model.backbone  # an IntermediateLayerGetter over mobilenet_v3's `features`
    position = {v: k for k, v in tv_backbone.return_layers.items()}  # "low" / "high" -> index in `features`
    name = "mobilenet_v3_large" if int(position["high"]) == 16 else "mobilenet_v3_small"
    trunk = TorchvisionBackbone(name, return_layers=(f"features.{position['low']}", f"features.{position['high']}"),
                                dilated=True)
    trunk.body.load_state_dict({f"features_{k}": v for k, v in tv_backbone.state_dict().items()})
    tv_head = tv_model.classifier
    head = LRASPPHead(tv_head.low_classifier.in_channels, tv_head.cbr[0].in_channels,
                      tv_head.low_classifier.out_channels, tv_head.cbr[0].out_channels, low_index=0, high_index=1)
    head.load_state_dict(tv_head.state_dict())
    return Segmenter(trunk, head)
