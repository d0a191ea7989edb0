"""cvzoo.heads.roi: output shapes, RPN row order (level, y, x, anchor), and equality with torchvision's
RPNHead, TwoMLPHead + FastRCNNPredictor, MaskRCNNHeads + MaskRCNNPredictor and KeypointRCNNHeads +
KeypointRCNNPredictor given the same weights; constructor and forward ValueErrors."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead as TVRPNHead
from torchvision.models.detection.rpn import concat_box_prediction_layers

from cvzoo.heads.roi import (
    Box3DHead,
    Box3DOutput,
    KeypointHead,
    MaskHead,
    ObjectAttributeHead,
    RoIBoxHead,
    RoIBoxOutput,
    RPNHead,
    RPNOutput,
)

C = 8
SIZES = [(5, 7), (3, 4), (1, 2)]  # odd, non-square maps: rows must not depend on square maps


def _feats(channels: int = C, sizes=SIZES, batch: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, channels, h, w, generator=g) for h, w in sizes]


def _pooled(n: int, channels: int = C, size=(7, 7), seed: int = 0) -> torch.Tensor:
    return torch.randn(n, channels, *size, generator=torch.Generator().manual_seed(seed))


def _randomise(module: nn.Module, scale: float = 0.3) -> None:
    """Weights large enough that every output position differs (the default inits are nearly constant)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _row(level: int, y: int, x: int, anchor: int, num_anchors: int, sizes=SIZES) -> int:
    offset = sum(h * w * num_anchors for h, w in sizes[:level])
    return offset + (y * sizes[level][1] + x) * num_anchors + anchor


# ---------------------------------------------------------------- RPNHead


def test_rpn_head_shapes_and_row_order():
    a = 3
    head = RPNHead(C, a, num_convs=2)
    _randomise(head)
    feats = _feats()
    out = head(feats)
    assert isinstance(out, RPNOutput)
    r = sum(h * w for h, w in SIZES) * a
    assert out.objectness.shape == (2, r, 1)
    assert out.box_deltas.shape == (2, r, 4)
    with torch.no_grad():
        obj_maps = [head.objectness(head.conv(f)) for f in feats]  # (B, A, H, W)
        box_maps = [head.box_deltas(head.conv(f)) for f in feats]  # (B, A*4, H, W), anchor-major channels
    # a manual permute of the convs' outputs: (B, A, H, W) -> (B, H, W, A) -> rows (level, y, x, anchor)
    manual_obj = torch.cat([o.permute(0, 2, 3, 1).reshape(2, -1, 1) for o in obj_maps], dim=1)
    manual_box = torch.cat([m.reshape(2, a, 4, *m.shape[-2:]).permute(0, 3, 4, 1, 2).reshape(2, -1, 4)
                            for m in box_maps], dim=1)
    torch.testing.assert_close(out.objectness, manual_obj, rtol=0, atol=0)
    torch.testing.assert_close(out.box_deltas, manual_box, rtol=0, atol=0)
    for level, y, x, anchor in [(0, 0, 0, 0), (0, 4, 6, 2), (0, 2, 3, 1), (1, 2, 3, 2), (2, 0, 1, 1)]:
        row = _row(level, y, x, anchor, a)
        for b in range(2):
            assert out.objectness[b, row, 0] == obj_maps[level][b, anchor, y, x]
            torch.testing.assert_close(out.box_deltas[b, row], box_maps[level][b, anchor * 4:(anchor + 1) * 4, y, x],
                                       rtol=0, atol=0)


@pytest.mark.parametrize("num_convs", [1, 2])
def test_rpn_head_equals_torchvision(num_convs):
    a = 3
    ref = TVRPNHead(C, a, conv_depth=num_convs)
    _randomise(ref)
    head = RPNHead(C, a, num_convs=num_convs)
    for block, tv_block in zip(head.conv, ref.conv):
        block[0].load_state_dict(tv_block[0].state_dict())
    head.objectness.load_state_dict(ref.cls_logits.state_dict())
    head.box_deltas.load_state_dict(ref.bbox_pred.state_dict())
    feats = _feats()
    with torch.no_grad():
        out = head(feats)
        tv_obj, tv_box = ref(feats)
        # torchvision's own flattening to rows (per image: level, y, x, anchor)
        ref_obj, ref_box = concat_box_prediction_layers(tv_obj, tv_box)  # (B R, 1), (B R, 4)
    torch.testing.assert_close(out.objectness.flatten(0, 1), ref_obj, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.box_deltas.flatten(0, 1), ref_box, rtol=0, atol=1e-6)


def test_rpn_head_init_matches_torchvision():
    """Both draw N(0, 0.01) weights and zero biases: same RNG state, same draws."""
    torch.manual_seed(5)
    ref = TVRPNHead(C, 3)
    torch.manual_seed(5)
    head = RPNHead(C, 3)
    for mine, theirs in [(head.conv[0][0], ref.conv[0][0]), (head.objectness, ref.cls_logits),
                         (head.box_deltas, ref.bbox_pred)]:
        assert torch.equal(mine.weight, theirs.weight)
        assert torch.equal(mine.bias, torch.zeros_like(mine.bias))


# ---------------------------------------------------------------- RoIBoxHead


@pytest.mark.parametrize("pooled_size", [7, (7, 5)])
def test_roi_box_head_equals_two_mlp_head_and_predictor(pooled_size):
    k, rep = 4, 32
    size = (pooled_size, pooled_size) if isinstance(pooled_size, int) else pooled_size
    head = RoIBoxHead(C, k, pooled_size, fc_sizes=(rep, rep))
    tv_head, tv_pred = TwoMLPHead(C * size[0] * size[1], rep), FastRCNNPredictor(rep, k + 1)
    _randomise(tv_head, 0.1)
    _randomise(tv_pred, 0.1)
    head.fcs[0].load_state_dict(tv_head.fc6.state_dict())
    head.fcs[1].load_state_dict(tv_head.fc7.state_dict())
    head.cls_score.load_state_dict(tv_pred.cls_score.state_dict())
    head.bbox_pred.load_state_dict(tv_pred.bbox_pred.state_dict())
    x = _pooled(6, size=size)
    with torch.no_grad():
        out = head(x)
        ref_scores, ref_deltas = tv_pred(tv_head(x))
    assert isinstance(out, RoIBoxOutput)
    assert out.cls_logits.shape == (6, k + 1)
    assert out.box_deltas.shape == (6, k + 1, 4)
    torch.testing.assert_close(out.cls_logits, ref_scores, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.box_deltas, ref_deltas.reshape(6, k + 1, 4), rtol=0, atol=1e-5)
    assert out.cls_logits.std() > 0.01  # the comparison is not between constants


def test_roi_box_head_convs_and_single_fc_shapes():
    """The v2 layout (convs, then one fc) on a non-square pooled size."""
    head = RoIBoxHead(C, 3, (5, 3), fc_sizes=(16,), conv_channels=(12, 12), norm_layer=nn.BatchNorm2d)
    out = head(_pooled(4, size=(5, 3)))
    assert out.cls_logits.shape == (4, 4)
    assert out.box_deltas.shape == (4, 4, 4)
    assert head.fcs[0].in_features == 12 * 5 * 3


# ---------------------------------------------------------------- MaskHead, KeypointHead


@pytest.mark.parametrize("dilation", [1, 2])
def test_mask_head_equals_torchvision(dilation):
    k, layers, dim = 3, (16, 16, 12), 10
    head = MaskHead(C, k, layers, dim, dilation=dilation)
    tv_head, tv_pred = MaskRCNNHeads(C, list(layers), dilation), MaskRCNNPredictor(layers[-1], dim, k + 1)
    _randomise(tv_head, 0.2)
    _randomise(tv_pred, 0.2)
    for block, tv_block in zip(head.convs, tv_head):
        block[0].load_state_dict(tv_block[0].state_dict())
    head.deconv.load_state_dict(tv_pred.conv5_mask.state_dict())
    w, b = tv_pred.mask_fcn_logits.weight, tv_pred.mask_fcn_logits.bias
    head.mask_logits.load_state_dict({"weight": w[1:], "bias": b[1:]})  # cvzoo: foreground classes only
    x = _pooled(5, size=(14, 14))
    with torch.no_grad():
        out = head(x)
        ref = tv_pred(tv_head(x))  # (N, K + 1, 28, 28), channel 0 the background
    assert out.shape == (5, k, 28, 28)
    assert ref.shape == (5, k + 1, 28, 28)
    torch.testing.assert_close(out, ref[:, 1:], rtol=0, atol=1e-5)


def test_mask_head_default_shape_and_init():
    head = MaskHead(C, 2)
    assert [block[0].out_channels for block in head.convs] == [256] * 4
    assert all((block[0].bias == 0).all() for block in head.convs)
    assert head(_pooled(3, size=(14, 14))).shape == (3, 2, 28, 28)
    assert head(_pooled(2, size=(7, 9))).shape == (2, 2, 14, 18)


def test_keypoint_head_equals_torchvision():
    k, layers = 5, (16, 16, 12)
    head = KeypointHead(C, k, layers)
    tv_head, tv_pred = KeypointRCNNHeads(C, list(layers)), KeypointRCNNPredictor(layers[-1], k)
    _randomise(tv_head, 0.2)
    _randomise(tv_pred, 0.2)
    convs = [m for m in tv_head if isinstance(m, nn.Conv2d)]
    for block, conv in zip(head.convs, convs):
        block[0].load_state_dict(conv.state_dict())
    head.deconv.load_state_dict(tv_pred.kps_score_lowres.state_dict())
    x = _pooled(4, size=(14, 14))
    with torch.no_grad():
        out = head(x)
        ref = tv_pred(tv_head(x))
    assert out.shape == ref.shape == (4, k, 56, 56)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_keypoint_head_default_layers():
    head = KeypointHead(C, 17, layers=(8, 8))
    assert head(_pooled(2, size=(14, 14))).shape == (2, 17, 56, 56)
    assert [block[0].out_channels for block in KeypointHead(C, 3).convs] == [512] * 8


# ---------------------------------------------------------------- Box3DHead, ObjectAttributeHead


def test_box3d_head_shapes():
    head = Box3DHead(C, (7, 5), num_yaw_bins=6, fc_sizes=(16,))
    out = head(_pooled(3, size=(7, 5)))
    assert isinstance(out, Box3DOutput)
    assert [tuple(t.shape) for t in out] == [(3, 1), (3, 3), (3, 6), (3, 6), (3, 2)]
    # the fields are consecutive slices of one linear layer's output, in the declared order
    with torch.no_grad():
        flat = head.out(head.mlp(_pooled(3, size=(7, 5)).flatten(1)))
    torch.testing.assert_close(torch.cat(list(out), dim=1), flat, rtol=0, atol=0)


def test_object_attribute_head_shapes():
    head = ObjectAttributeHead(C, {"price": (), "corners": (4, 2), "count": 3}, pooled_size=(7, 5), fc_sizes=(16,))
    x = _pooled(6, size=(7, 5))
    out = head(x)
    assert set(out) == {"price", "corners", "count"}
    assert out["price"].shape == (6,)
    assert out["corners"].shape == (6, 4, 2)
    assert out["count"].shape == (6, 3)
    with torch.no_grad():  # each output is its own linear layer on the shared MLP, reshaped row-major
        h = head.mlp(x.flatten(1))
        torch.testing.assert_close(out["corners"], head.outputs["corners"](h).reshape(6, 4, 2), rtol=0, atol=0)
        torch.testing.assert_close(out["price"], head.outputs["price"](h)[:, 0], rtol=0, atol=0)
    assert head(_pooled(0, size=(7, 5)))["corners"].shape == (0, 4, 2)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(("build", "match"), [
    (lambda: RPNHead(0), "in_channels=0"),
    (lambda: RPNHead(C, num_anchors=0), "num_anchors=0"),
    (lambda: RPNHead(C, num_convs=-1), "num_convs"),
    (lambda: RoIBoxHead(C, 0), "num_classes=0"),
    (lambda: RoIBoxHead(C, 3, pooled_size=0), "pooled_size"),
    (lambda: RoIBoxHead(C, 3, pooled_size=(7,)), "pooled_size"),
    (lambda: RoIBoxHead(C, 3, fc_sizes=(16, 0)), "size_1=0"),
    (lambda: MaskHead(-1, 3), "in_channels=-1"),
    (lambda: MaskHead(C, 3, dilation=0), "dilation=0"),
    (lambda: KeypointHead(C, 0), "num_keypoints=0"),
    (lambda: Box3DHead(C, num_yaw_bins=0), "num_yaw_bins=0"),
    (lambda: Box3DHead(C, pooled_size=(7, -1)), "pooled_size"),
    (lambda: ObjectAttributeHead(C, {}), "outputs"),
    (lambda: ObjectAttributeHead(C, [("price", ())]), "outputs"),
    (lambda: ObjectAttributeHead(C, {"not an identifier": ()}), "outputs"),
    (lambda: ObjectAttributeHead(C, {"corners": (4, 0)}), "corners"),
    (lambda: ObjectAttributeHead(0, {"price": ()}), "in_channels=0"),
])
def test_constructor_value_errors(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize(("head", "x"), [
    (RoIBoxHead(C, 3, fc_sizes=(16,)), torch.zeros(2, C + 1, 7, 7)),  # wrong channels
    (RoIBoxHead(C, 3, fc_sizes=(16,)), torch.zeros(2, C, 49)),  # not (N, C, S, S)
    (MaskHead(C, 3, (8,), 8), torch.zeros(C, 14, 14)),
    (MaskHead(C, 3, (8,), 8), torch.zeros(2, 4, 14, 14)),
    (KeypointHead(C, 3, (8,)), torch.zeros(2, 3, 14, 14)),
    (Box3DHead(C, fc_sizes=(8,)), torch.zeros(2, C, 7, 7, 1)),
    (ObjectAttributeHead(C, {"price": ()}, fc_sizes=(8,)), torch.zeros(2, 2 * C, 7, 7)),
])
def test_forward_value_errors_name_the_head_and_shape(head, x):
    shape = re.escape(str(tuple(x.shape)))
    expected = rf"{type(head).__name__} takes pooled features \(N, {C}, S_h, S_w\), got shape {shape}"
    with pytest.raises(ValueError, match=expected):
        head(x)


@pytest.mark.parametrize("name", ["values", "keys"])
def test_object_attribute_head_output_named_like_a_module_dict_attribute(name):
    """Such a name is either a usable output or a ValueError naming it; never an error from deep in torch."""
    try:
        head = ObjectAttributeHead(C, {name: (3,)}, fc_sizes=(8,))
    except ValueError as e:
        assert repr(name) in str(e)
        return
    assert head(_pooled(2))[name].shape == (2, 3)
