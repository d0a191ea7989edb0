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
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from cvzoo.backbones.resnet import ResNet
from cvzoo.detection.assigners import FCOSAssigner, MaxIoUAssigner
from cvzoo.detection.coders import BoxCoder
from cvzoo.detection.fcos import FCOS
from cvzoo.detection.priors import AnchorGenerator
from cvzoo.detection.retinanet import RetinaNet
from cvzoo.detection.roi import MultiLevelRoIAlign
from cvzoo.heads.dense import FCOSHead, RetinaHead, group_norm_32
from cvzoo.necks.fpn import FPN


def _trunk_and_fpn(tv_model: nn.Module) -> tuple[ResNet, FPN]:
    """torchvision's ResNet FPN backbone: layer2-4 + P6/P7 convs (RetinaNet, FCOS) or layer1-4 + a max-pooled
    P6 (the R-CNNs) -> cvzoo ResNet and FPN with its weights."""
    body, tv_fpn = tv_model.backbone.body, tv_model.backbone.fpn
    if not hasattr(body, "layer4") or not hasattr(body.layer1[0], "conv2"):
        raise ValueError("from_torchvision expects a torchvision ResNet FPN backbone, got "
                         f"{type(body).__name__} with layers {[n for n, _ in body.named_children()]}")
    norm = FrozenBatchNorm2d if isinstance(body.bn1, FrozenBatchNorm2d) else nn.BatchNorm2d
    layers = tuple(len(getattr(body, f"layer{i}")) for i in range(1, 5))
    block = "bottleneck" if hasattr(body.layer1[0], "conv3") else "basic"
    num_inputs = len(tv_fpn.inner_blocks)
    trunk = ResNet(layers=layers, block=block, out_indices=tuple(range(4 - num_inputs, 4)), norm_layer=norm)
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
        raise ValueError(f"from_torchvision expects an FPN over the last {num_inputs} ResNet stages (channels "
                         f"{[f.channels for f in trunk.feature_info]}), got FPN inputs of {tv_channels} channels")
    extra = tv_fpn.extra_blocks
    channels = tv_fpn.inner_blocks[0][0].out_channels
    if isinstance(extra, LastLevelMaxPool):
        fpn = FPN(trunk.feature_info, channels, extra_levels=1, extra_mode="maxpool")
    elif extra is not None and hasattr(extra, "p6"):
        fpn = FPN(trunk.feature_info, channels, extra_levels=2, extra_source="output" if extra.use_P5 else "input")
    else:
        raise ValueError(f"from_torchvision expects the FPN's LastLevelP6P7 or LastLevelMaxPool extra block, got "
                         f"{type(extra).__name__}")
    state = {}
    for i in range(len(tv_fpn.inner_blocks)):
        for p in ("weight", "bias"):
            state[f"lateral.{i}.0.{p}"] = tv_fpn.inner_blocks[i][0].state_dict()[p]
            state[f"smooth.{i}.0.{p}"] = tv_fpn.layer_blocks[i][0].state_dict()[p]
    if hasattr(extra, "p6"):
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


def _pooler_of(tv_pool: nn.Module, strides) -> MultiLevelRoIAlign:
    size = tv_pool.output_size
    size = size if isinstance(size, int) else tuple(size)
    canonical = (getattr(tv_pool, "canonical_scale", 224), getattr(tv_pool, "canonical_level", 4))
    return MultiLevelRoIAlign(size, tv_pool.sampling_ratio, strides[:len(tv_pool.featmap_names)],
                              canonical_scale=canonical[0], canonical_level=canonical[1])


def two_stage_from_torchvision(tv_model: nn.Module, cls: type | None = None):
    """torchvision `fasterrcnn_resnet50_fpn`, `maskrcnn_resnet50_fpn` or `keypointrcnn_resnet50_fpn` -> cvzoo
    FasterRCNN / MaskRCNN / KeypointRCNN with the same weights and settings. torchvision's class 0 is the
    background: its class c is cvzoo's c - 1 (`num_classes` one fewer)."""
    from cvzoo.detection.roi_heads import BoxBranch, KeypointBranch, MaskBranch
    from cvzoo.detection.rpn import RegionProposalNetwork
    from cvzoo.detection.two_stage import FasterRCNN, KeypointRCNN, MaskRCNN
    from cvzoo.heads.roi import KeypointHead, MaskHead, RoIBoxHead, RPNHead

    trunk, fpn = _trunk_and_fpn(tv_model)
    strides = tuple(f.stride for f in fpn.feature_info)
    channels = fpn.feature_info[0].channels
    tv_rpn, tv_roi = tv_model.rpn, tv_model.roi_heads

    head = RPNHead(channels, tv_rpn.head.cls_logits.out_channels, num_convs=len(tv_rpn.head.conv))
    for i, block in enumerate(tv_rpn.head.conv):
        head.conv[i][0].load_state_dict(block[0].state_dict())
    head.objectness.load_state_dict(tv_rpn.head.cls_logits.state_dict())
    head.box_deltas.load_state_dict(tv_rpn.head.bbox_pred.state_dict())
    gen = tv_rpn.anchor_generator
    m, s = tv_rpn.proposal_matcher, tv_rpn.fg_bg_sampler
    rpn = RegionProposalNetwork(
        head, AnchorGenerator(gen.sizes, gen.aspect_ratios[0], strides),
        MaxIoUAssigner(m.high_threshold, m.low_threshold, m.allow_low_quality_matches),
        BoxCoder(tv_rpn.box_coder.weights, tv_rpn.box_coder.bbox_xform_clip), s.batch_size_per_image,
        s.positive_fraction, tv_rpn._pre_nms_top_n["training"], tv_rpn._post_nms_top_n["training"],
        tv_rpn._pre_nms_top_n["testing"], tv_rpn._post_nms_top_n["testing"], tv_rpn.nms_thresh,
        tv_rpn.score_thresh, tv_rpn.min_size)

    tv_box, tv_pred = tv_roi.box_head, tv_roi.box_predictor
    if not hasattr(tv_box, "fc6"):
        raise ValueError(f"from_torchvision expects the v1 TwoMLPHead box head, got {type(tv_box).__name__}")
    num_classes = tv_pred.cls_score.out_features - 1
    box_head = RoIBoxHead(channels, num_classes, tv_roi.box_roi_pool.output_size,
                          fc_sizes=(tv_box.fc6.out_features, tv_box.fc7.out_features))
    box_head.fcs[0].load_state_dict(tv_box.fc6.state_dict())
    box_head.fcs[1].load_state_dict(tv_box.fc7.state_dict())
    box_head.cls_score.load_state_dict(tv_pred.cls_score.state_dict())
    box_head.bbox_pred.load_state_dict(tv_pred.bbox_pred.state_dict())
    m, s = tv_roi.proposal_matcher, tv_roi.fg_bg_sampler
    box_branch = BoxBranch(
        box_head, _pooler_of(tv_roi.box_roi_pool, strides),
        MaxIoUAssigner(m.high_threshold, m.low_threshold, m.allow_low_quality_matches),
        BoxCoder(tv_roi.box_coder.weights, tv_roi.box_coder.bbox_xform_clip), s.batch_size_per_image,
        s.positive_fraction, tv_roi.score_thresh, tv_roi.nms_thresh, tv_roi.detections_per_img)

    kwargs = {"rpn": rpn, "box_branch": box_branch}
    if tv_roi.has_mask():
        convs = [b[0] for b in tv_roi.mask_head]
        mask_head = MaskHead(channels, num_classes, [c.out_channels for c in convs],
                             tv_roi.mask_predictor.conv5_mask.out_channels, dilation=convs[0].dilation[0])
        for block, conv in zip(mask_head.convs, convs):
            block[0].load_state_dict(conv.state_dict())
        mask_head.deconv.load_state_dict(tv_roi.mask_predictor.conv5_mask.state_dict())
        logits = tv_roi.mask_predictor.mask_fcn_logits
        mask_head.mask_logits.load_state_dict({"weight": logits.weight[1:], "bias": logits.bias[1:]})  # no background
        model = MaskRCNN(trunk, fpn, num_classes, MaskBranch(mask_head, _pooler_of(tv_roi.mask_roi_pool, strides)),
                         **kwargs)
    elif tv_roi.has_keypoint():
        convs = [c for c in tv_roi.keypoint_head if isinstance(c, nn.Conv2d)]
        deconv = tv_roi.keypoint_predictor.kps_score_lowres
        kp_head = KeypointHead(channels, deconv.out_channels, [c.out_channels for c in convs])
        for block, conv in zip(kp_head.convs, convs):
            block[0].load_state_dict(conv.state_dict())
        kp_head.deconv.load_state_dict(deconv.state_dict())
        model = KeypointRCNN(trunk, fpn, num_classes, deconv.out_channels,
                             KeypointBranch(kp_head, _pooler_of(tv_roi.keypoint_roi_pool, strides)), **kwargs)
    else:
        model = FasterRCNN(trunk, fpn, num_classes, **kwargs)
    if cls is not None and type(model) is not cls:
        raise ValueError(f"{cls.__name__}.from_torchvision got a torchvision {type(tv_model).__name__} that converts "
                         f"to {type(model).__name__}; call {type(model).__name__}.from_torchvision")
    return _take_normalisation(model, tv_model)
