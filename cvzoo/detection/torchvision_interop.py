"""torchvision's RetinaNet and FCOS weights in cvzoo compositions.

The torchvision model's trunk, FPN and head weights are copied into cvzoo's own ResNet, FPN and
RetinaHead/FCOSHead; anchors, matching thresholds, box loss and post-processing settings are taken
over too. What stays different is pre-processing: torchvision's `GeneralizedRCNNTransform` normalises
[0, 1] images with its image_mean/std and resizes them (shorter side to min_size=800, longer at most
1333) inside the model; cvzoo models take already normalised images at the size given. To run
torchvision's COCO weights in cvzoo, resize images as you like, normalise them with
`model.signature.normalize`, and call `model.predict` (boxes come back in the pixels of what you fed).
"""

from __future__ import annotations

from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from cvzoo.backbones.resnet import ResNet
from cvzoo.detection.assigners import FCOSAssigner, MaxIoUAssigner
from cvzoo.detection.fcos import FCOS
from cvzoo.detection.priors import AnchorGenerator
from cvzoo.detection.retinanet import RetinaNet
from cvzoo.heads.dense import FCOSHead, RetinaHead, group_norm_32
from cvzoo.necks.fpn import FPN


def _trunk_and_fpn(tv_model: nn.Module) -> tuple[ResNet, FPN]:
    body, tv_fpn = tv_model.backbone.body, tv_model.backbone.fpn
    if not hasattr(body, "layer4") or not hasattr(body.layer1[0], "conv2"):
        raise ValueError("from_torchvision expects a torchvision ResNet FPN backbone, got "
                         f"{type(body).__name__} with layers {[n for n, _ in body.named_children()]}")
    norm = FrozenBatchNorm2d if isinstance(body.bn1, FrozenBatchNorm2d) else nn.BatchNorm2d
    layers = tuple(len(getattr(body, f"layer{i}")) for i in range(1, 5))
    block = "bottleneck" if hasattr(body.layer1[0], "conv3") else "basic"
    trunk = ResNet(layers=layers, block=block, out_indices=(1, 2, 3), norm_layer=norm)
    trunk.load_state_dict(body.state_dict())
    frozen = -1  # torchvision's trainable_layers, as frozen_stages: count the leading frozen parts
    for prefixes in (("conv1", "bn1"), *((f"layer{i}",) for i in range(1, 5))):
        params = [p for n, p in body.named_parameters() if n.split(".")[0] in prefixes]
        if not params or any(p.requires_grad for p in params) or frozen == 3:
            break
        frozen += 1
    trunk.freeze_stages(frozen)

    tv_channels = [b[0].in_channels for b in tv_fpn.inner_blocks]
    if tv_channels != [f.channels for f in trunk.feature_info]:
        raise ValueError(f"from_torchvision expects an FPN over layer2-layer4 (channels "
                         f"{[f.channels for f in trunk.feature_info]}), got FPN inputs of {tv_channels} channels")
    extra = tv_fpn.extra_blocks
    if extra is None or not hasattr(extra, "p6"):
        raise ValueError(f"from_torchvision expects the FPN's LastLevelP6P7 extra block, got {type(extra).__name__}")
    fpn = FPN(trunk.feature_info, tv_fpn.inner_blocks[0][0].out_channels, extra_levels=2,
              extra_source="output" if extra.use_P5 else "input")
    state = {}
    for i in range(len(tv_fpn.inner_blocks)):
        for p in ("weight", "bias"):
            state[f"lateral.{i}.0.{p}"] = tv_fpn.inner_blocks[i][0].state_dict()[p]
            state[f"smooth.{i}.0.{p}"] = tv_fpn.layer_blocks[i][0].state_dict()[p]
    for p in ("weight", "bias"):
        state[f"extra.convs.0.{p}"] = extra.p6.state_dict()[p]
        state[f"extra.convs.1.{p}"] = extra.p7.state_dict()[p]
    fpn.load_state_dict(state)
    return trunk, fpn


def _copy_tower(dst: nn.Sequential, src_modules: list[nn.Module]) -> None:
    """src_modules: the torchvision tower's convs and norms in order -> cvzoo ConvNormAct blocks."""
    convs = [m for m in src_modules if isinstance(m, nn.Conv2d)]
    norms = [m for m in src_modules if isinstance(m, nn.GroupNorm)]
    for i, block in enumerate(dst):
        block[0].load_state_dict(convs[i].state_dict())
        if norms:
            block[1].load_state_dict(norms[i].state_dict())


def retinanet_from_torchvision(tv_model: nn.Module) -> RetinaNet:
    """torchvision `retinanet_resnet50_fpn` (v1) or `retinanet_resnet50_fpn_v2` -> cvzoo RetinaNet."""
    trunk, fpn = _trunk_and_fpn(tv_model)
    tv_head = tv_model.head
    cls_head, reg_head = tv_head.classification_head, tv_head.regression_head
    has_norm = any(isinstance(m, nn.GroupNorm) for m in cls_head.conv.modules())
    head = RetinaHead(fpn.feature_info[0].channels, cls_head.num_classes, cls_head.num_anchors,
                      num_convs=len(cls_head.conv), norm_layer=group_norm_32 if has_norm else None)
    _copy_tower(head.cls_tower, list(cls_head.conv.modules()))
    _copy_tower(head.box_tower, list(reg_head.conv.modules()))
    head.cls_logits.load_state_dict(cls_head.cls_logits.state_dict())
    head.box_deltas.load_state_dict(reg_head.bbox_reg.state_dict())

    gen = tv_model.anchor_generator
    strides = tuple(f.stride for f in fpn.feature_info)
    anchors = AnchorGenerator(gen.sizes, gen.aspect_ratios[0], strides)
    matcher = tv_model.proposal_matcher
    model = RetinaNet(
        trunk, fpn, head, anchors,
        MaxIoUAssigner(matcher.high_threshold, matcher.low_threshold, matcher.allow_low_quality_matches),
        box_loss=reg_head._loss_type, score_thresh=tv_model.score_thresh, nms_thresh=tv_model.nms_thresh,
        max_detections=tv_model.detections_per_img, topk_candidates=tv_model.topk_candidates,
    )
    return _take_normalisation(model, tv_model)


def fcos_from_torchvision(tv_model: nn.Module) -> FCOS:
    """torchvision `fcos_resnet50_fpn` -> cvzoo FCOS (points at cell corners, as torchvision)."""
    trunk, fpn = _trunk_and_fpn(tv_model)
    cls_head, reg_head = tv_model.head.classification_head, tv_model.head.regression_head
    num_convs = sum(isinstance(m, nn.Conv2d) for m in cls_head.conv)
    head = FCOSHead(fpn.feature_info[0].channels, cls_head.num_classes, len(fpn.feature_info), num_convs)
    _copy_tower(head.cls_tower, list(cls_head.conv))
    _copy_tower(head.box_tower, list(reg_head.conv))
    head.cls_logits.load_state_dict(cls_head.cls_logits.state_dict())
    head.box_distances.load_state_dict(reg_head.bbox_reg.state_dict())
    head.centerness.load_state_dict(reg_head.bbox_ctrness.state_dict())
    model = FCOS(trunk, fpn, head, FCOSAssigner(tv_model.center_sampling_radius), point_offset=0.0,
                 score_thresh=tv_model.score_thresh, nms_thresh=tv_model.nms_thresh,
                 max_detections=tv_model.detections_per_img, topk_candidates=tv_model.topk_candidates)
    return _take_normalisation(model, tv_model)


def _take_normalisation(model, tv_model):
    model.signature = model.signature.replace(mean=tuple(tv_model.transform.image_mean),
                                              std=tuple(tv_model.transform.image_std))
    return model
