"""Heads of two-stage detectors: the RPN head on the pyramid, and per-object heads on RoI-pooled features.

Like every head they know nothing of boxes, anchors or targets: the RPN head returns objectness logits and
raw box codes per anchor; an RoI head maps pooled features (N, C, S, S) of N regions to raw per-region
outputs (N, ...), whose meaning (class deltas, mask logits, heatmaps, 3D codes) the detector's RoI branch
defines. Class-specific outputs of the box head keep the background at index 0 (torchvision's layout);
mask heads predict one mask per foreground class.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvzoo.heads.dense import _flatten
from cvzoo.layers import ConvNormAct, NormLayer, init_conv_normal_


class RPNOutput(NamedTuple):
    objectness: Tensor  # (B, R, 1) logits, R = sum_l H_l*W_l*A, rows ordered (level, y, x, anchor)
    box_deltas: Tensor  # (B, R, 4), encoded w.r.t. the anchor of the same row


class RoIBoxOutput(NamedTuple):
    cls_logits: Tensor  # (N, K + 1), column 0 is the background
    box_deltas: Tensor  # (N, K + 1, 4), one box code per class (the background's is unused)


class Box3DOutput(NamedTuple):
    depth: Tensor  # (N, 1) log-depth code
    size: Tensor  # (N, 3) log of the 3D size (w, h, l) relative to the branch's reference size
    yaw_logits: Tensor  # (N, bins) which yaw bin
    yaw_residual: Tensor  # (N, bins) offset from each bin's centre, in units of half a bin
    center_offset: Tensor  # (N, 2) projected 3D centre relative to the box centre, in box widths/heights


# in-place ReLUs after convs and linears (safe: their backward needs the inputs, not the outputs) save a
# copy of every RoI's feature map, as torchvision's heads do
_relu = partial(nn.ReLU, inplace=True)


def _check_positive(name: str, **values: int) -> None:
    bad = {k: v for k, v in values.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
    if bad:
        raise ValueError(f"{name} needs positive integers, got " + ", ".join(f"{k}={v!r}" for k, v in bad.items()))


def _pooled_size(pooled_size: int | tuple[int, int]) -> tuple[int, int]:
    size = (pooled_size, pooled_size) if isinstance(pooled_size, int) else tuple(pooled_size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"pooled_size must be a positive int or a pair of them, got {pooled_size!r}")
    return size


def _check_pooled(x: Tensor, channels: int, name: str) -> None:
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"{name} takes pooled features (N, {channels}, S_h, S_w), got shape {tuple(x.shape)}")


class RPNHead(nn.Module):
    """Region proposal head (Ren et al. 2015), shared over levels: 3x3 conv(s) + ReLU, then 1x1 convs to
    A objectness logits and A*4 box deltas a location. Same layers and init as torchvision's RPNHead.

    [(B, C, H_l, W_l)] -> RPNOutput((B, R, 1), (B, R, 4)), R = sum_l H_l * W_l * A.
    """

    def __init__(self, in_channels: int, num_anchors: int = 3, num_convs: int = 1,
                 norm_layer: NormLayer | None = None) -> None:
        super().__init__()
        _check_positive("RPNHead", in_channels=in_channels, num_anchors=num_anchors)
        if isinstance(num_convs, bool) or not isinstance(num_convs, int) or num_convs < 0:
            raise ValueError(f"num_convs must be an int >= 0, got {num_convs!r}")
        self.num_anchors = num_anchors
        self.conv = nn.Sequential(*(ConvNormAct(in_channels, in_channels, 3, norm_layer=norm_layer, act_layer=_relu)
                                    for _ in range(num_convs)))
        self.objectness = nn.Conv2d(in_channels, num_anchors, 1)
        self.box_deltas = nn.Conv2d(in_channels, num_anchors * 4, 1)
        init_conv_normal_(self, std=0.01)

    def forward(self, feats: Sequence[Tensor]) -> RPNOutput:
        obj, box = [], []
        for f in feats:  # loop over levels (static count), never over images
            t = self.conv(f)
            obj.append(_flatten(self.objectness(t), 1))  # (B, HWA, 1)
            box.append(_flatten(self.box_deltas(t), 4))  # (B, HWA, 4)
        return RPNOutput(torch.cat(obj, dim=1), torch.cat(box, dim=1))


class RoIBoxHead(nn.Module):
    """Fast R-CNN box head: optional 3x3 convs, fully connected layers with ReLU (two of 1024 by default:
    torchvision's TwoMLPHead), then K + 1 class logits (background first) and per-class box deltas
    (torchvision's FastRCNNPredictor). With `conv_channels=(256,) * 4, fc_sizes=(1024,)` and a norm layer
    it is the Faster R-CNN v2 head.

    (N, C, S_h, S_w) -> RoIBoxOutput((N, K + 1), (N, K + 1, 4)).
    """

    def __init__(self, in_channels: int, num_classes: int, pooled_size: int | tuple[int, int] = 7,
                 fc_sizes: Sequence[int] = (1024, 1024), conv_channels: Sequence[int] = (),
                 norm_layer: NormLayer | None = None) -> None:
        super().__init__()
        _check_positive("RoIBoxHead", in_channels=in_channels, num_classes=num_classes)
        for i, c in enumerate((*fc_sizes, *conv_channels)):
            _check_positive("RoIBoxHead", **{f"size_{i}": c})
        sh, sw = _pooled_size(pooled_size)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.convs = nn.Sequential()
        c = in_channels
        for out in conv_channels:
            self.convs.append(ConvNormAct(c, out, 3, norm_layer=norm_layer, act_layer=_relu))
            c = out
        self.fcs = nn.ModuleList()
        n = c * sh * sw
        for size in fc_sizes:
            self.fcs.append(nn.Linear(n, size))
            n = size
        self.cls_score = nn.Linear(n, num_classes + 1)
        self.bbox_pred = nn.Linear(n, (num_classes + 1) * 4)

    def forward(self, x: Tensor) -> RoIBoxOutput:
        _check_pooled(x, self.in_channels, "RoIBoxHead")
        x = self.convs(x).flatten(1)  # (N, C' S_h S_w)
        for fc in self.fcs:
            x = F.relu(fc(x), inplace=True)
        return RoIBoxOutput(self.cls_score(x), self.bbox_pred(x).reshape(x.shape[0], -1, 4))  # (N, K+1, 4)


class MaskHead(nn.Module):
    """Mask R-CNN mask head: 3x3 convs (4 x 256, torchvision's MaskRCNNHeads), a 2x2 stride-2 transposed
    conv + ReLU and a 1x1 conv to one mask logit map per foreground class (MaskRCNNPredictor).

    (N, C, S, S) -> (N, K, 2S, 2S) logits.
    """

    def __init__(self, in_channels: int, num_classes: int, layers: Sequence[int] = (256, 256, 256, 256),
                 dim_reduced: int = 256, dilation: int = 1, norm_layer: NormLayer | None = None) -> None:
        super().__init__()
        _check_positive("MaskHead", in_channels=in_channels, num_classes=num_classes, dim_reduced=dim_reduced,
                        dilation=dilation)
        self.in_channels = in_channels
        self.num_classes = num_classes
        blocks, c = [], in_channels
        for out in layers:
            blocks.append(ConvNormAct(c, out, 3, padding=dilation, dilation=dilation, norm_layer=norm_layer,
                                      act_layer=_relu))
            c = out
        self.convs = nn.Sequential(*blocks)
        self.deconv = nn.ConvTranspose2d(c, dim_reduced, 2, 2)
        self.mask_logits = nn.Conv2d(dim_reduced, num_classes, 1)
        for m in self.modules():  # torchvision's init (the predictor's biases keep PyTorch's default)
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for block in self.convs:
            if block[0].bias is not None:
                nn.init.zeros_(block[0].bias)

    def forward(self, x: Tensor) -> Tensor:
        _check_pooled(x, self.in_channels, "MaskHead")
        return self.mask_logits(F.relu(self.deconv(self.convs(x)), inplace=True))


class KeypointHead(nn.Module):
    """Keypoint R-CNN head: 3x3 convs + ReLU (8 x 512, torchvision's KeypointRCNNHeads), a 4x4 stride-2
    transposed conv to K heatmaps, then 2x bilinear upsampling (KeypointRCNNPredictor).

    (N, C, S, S) -> (N, K, 4S, 4S) heatmap logits (a softmax over each map's pixels gives the location).
    """

    def __init__(self, in_channels: int, num_keypoints: int, layers: Sequence[int] = (512,) * 8,
                 norm_layer: NormLayer | None = None) -> None:
        super().__init__()
        _check_positive("KeypointHead", in_channels=in_channels, num_keypoints=num_keypoints)
        self.in_channels = in_channels
        self.num_keypoints = num_keypoints
        blocks, c = [], in_channels
        for out in layers:
            blocks.append(ConvNormAct(c, out, 3, norm_layer=norm_layer, act_layer=_relu))
            c = out
        self.convs = nn.Sequential(*blocks)
        self.deconv = nn.ConvTranspose2d(c, num_keypoints, 4, stride=2, padding=1)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        _check_pooled(x, self.in_channels, "KeypointHead")
        x = self.deconv(self.convs(x))
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False, recompute_scale_factor=False)


def _mlp(in_features: int, fc_sizes: Sequence[int]) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    n = in_features
    for size in fc_sizes:
        layers += [nn.Linear(n, size), nn.ReLU()]
        n = size
    return nn.Sequential(*layers), n


class Box3DHead(nn.Module):
    """Monocular 3D box head (per object, class-agnostic): from pooled features, a shared MLP predicts
    the depth code, the log 3D size, yaw as bin classification plus a residual per bin (MultiBin,
    Mousavian et al. 2017), and the projected 3D centre's offset from the 2D box centre.

    (N, C, S_h, S_w) -> Box3DOutput((N, 1), (N, 3), (N, bins), (N, bins), (N, 2)).
    """

    def __init__(self, in_channels: int, pooled_size: int | tuple[int, int] = 7, num_yaw_bins: int = 12,
                 fc_sizes: Sequence[int] = (256, 256)) -> None:
        super().__init__()
        _check_positive("Box3DHead", in_channels=in_channels, num_yaw_bins=num_yaw_bins)
        sh, sw = _pooled_size(pooled_size)
        self.in_channels = in_channels
        self.num_yaw_bins = num_yaw_bins
        self.mlp, n = _mlp(in_channels * sh * sw, fc_sizes)
        self.out = nn.Linear(n, 1 + 3 + 2 * num_yaw_bins + 2)

    def forward(self, x: Tensor) -> Box3DOutput:
        _check_pooled(x, self.in_channels, "Box3DHead")
        o = self.out(self.mlp(x.flatten(1)))  # (N, 6 + 2 bins)
        bins = self.num_yaw_bins
        depth, size, yaw_logits, yaw_res, ctr = o.split([1, 3, bins, bins, 2], dim=1)
        return Box3DOutput(depth, size, yaw_logits, yaw_res, ctr)


class ObjectAttributeHead(nn.Module):
    """Custom per-object outputs: a shared MLP on pooled features, then one linear layer per named
    output of any shape (`{"price": (), "corners": (4, 2)}`: a scalar and four 2D points per object).

    (N, C, S_h, S_w) -> {name: (N, *shape)}.
    """

    def __init__(self, in_channels: int, outputs: Mapping[str, int | Sequence[int]],
                 pooled_size: int | tuple[int, int] = 7, fc_sizes: Sequence[int] = (256, 256)) -> None:
        super().__init__()
        _check_positive("ObjectAttributeHead", in_channels=in_channels)
        if not isinstance(outputs, Mapping) or not outputs:
            raise ValueError(f"outputs must be a non-empty mapping of name -> shape, got {outputs!r}")
        sh, sw = _pooled_size(pooled_size)
        self.in_channels = in_channels
        self.shapes: dict[str, tuple[int, ...]] = {}
        for name, shape in outputs.items():
            shape = (shape,) if isinstance(shape, int) else tuple(shape)
            if not isinstance(name, str) or not name.isidentifier() or \
                    not all(isinstance(s, int) and s > 0 for s in shape):
                raise ValueError(f"outputs[{name!r}] must map an identifier to a shape of positive ints, got {shape}")
            if hasattr(nn.ModuleDict, name):
                raise ValueError(f"outputs[{name!r}]: the name clashes with an nn.ModuleDict attribute; pick another")
            self.shapes[name] = shape
        self.mlp, n = _mlp(in_channels * sh * sw, fc_sizes)
        self.outputs = nn.ModuleDict({name: nn.Linear(n, math.prod(shape)) for name, shape in self.shapes.items()})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        _check_pooled(x, self.in_channels, "ObjectAttributeHead")
        h = self.mlp(x.flatten(1))
        return {name: layer(h).reshape(x.shape[0], *self.shapes[name]) for name, layer in self.outputs.items()}
