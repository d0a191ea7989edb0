"""cvzoo.heads.dense: output shapes, (level, y, x, anchor) row order, init, per-level scales, validation.

Rows are checked against the conv outputs at known positions and against torchvision's RetinaNetHead
with the same weights; biases against the closed form -log((1 - p) / p).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchvision.models.detection.retinanet import RetinaNetHead

from cvzoo.heads import ATSSHead, CenterNetHead, FCOSHead, RetinaHead
from cvzoo.heads.dense import ATSSOutput, CenterNetOutput, DenseOutput, FCOSOutput, group_norm_32

C = 8
SIZES = [(5, 7), (3, 4), (1, 2)]  # odd sizes: rows must not depend on square maps


def _feats(channels: int = C, sizes=SIZES, batch: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, channels, h, w, generator=g) for h, w in sizes]


def _randomise(module: nn.Module) -> None:
    """Weights large enough that every output position differs (the default init is nearly constant)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _row(level: int, y: int, x: int, anchor: int, num_anchors: int, sizes=SIZES) -> int:
    offset = sum(h * w * num_anchors for h, w in sizes[:level])
    return offset + (y * sizes[level][1] + x) * num_anchors + anchor


POSITIONS = [(0, 0, 0, 0), (0, 4, 6, 2), (0, 2, 3, 1), (1, 1, 2, 0), (1, 2, 3, 2), (2, 0, 1, 1)]


def test_retina_head_shapes_and_row_order():
    a, k = 3, 4
    head = RetinaHead(C, k, num_anchors=a, num_convs=2)
    _randomise(head)
    feats = _feats()
    out = head(feats)
    assert isinstance(out, DenseOutput)
    r = sum(h * w for h, w in SIZES) * a
    assert out.cls_logits.shape == (2, r, k)
    assert out.box_deltas.shape == (2, r, 4)
    with torch.no_grad():
        cls_maps = [head.cls_logits(head.cls_tower(f)) for f in feats]  # (B, A*K, H, W), anchor-major channels
        box_maps = [head.box_deltas(head.box_tower(f)) for f in feats]  # (B, A*4, H, W)
    for level, y, x, anchor in POSITIONS:
        row = _row(level, y, x, anchor, a)
        for b in range(2):
            torch.testing.assert_close(out.cls_logits[b, row], cls_maps[level][b, anchor * k:(anchor + 1) * k, y, x])
            torch.testing.assert_close(out.box_deltas[b, row], box_maps[level][b, anchor * 4:(anchor + 1) * 4, y, x])


def test_retina_head_equals_torchvision_retinanet_head():
    a, k = 3, 4
    ref = RetinaNetHead(C, a, k)  # 4-conv towers without norm
    head = RetinaHead(C, k, num_anchors=a, num_convs=4)
    _randomise(ref)
    cls_convs = [m for m in ref.classification_head.conv.modules() if isinstance(m, nn.Conv2d)]
    box_convs = [m for m in ref.regression_head.conv.modules() if isinstance(m, nn.Conv2d)]
    for i in range(4):
        head.cls_tower[i][0].load_state_dict(cls_convs[i].state_dict())
        head.box_tower[i][0].load_state_dict(box_convs[i].state_dict())
    head.cls_logits.load_state_dict(ref.classification_head.cls_logits.state_dict())
    head.box_deltas.load_state_dict(ref.regression_head.bbox_reg.state_dict())
    feats = _feats()
    expected = ref(feats)
    out = head(feats)
    torch.testing.assert_close(out.cls_logits, expected["cls_logits"])
    torch.testing.assert_close(out.box_deltas, expected["bbox_regression"])


@pytest.mark.parametrize("prior_prob", [0.01, 0.2])
def test_class_bias_is_focal_prior(prior_prob):
    bias = -math.log((1 - prior_prob) / prior_prob)
    heads = [
        RetinaHead(C, 3, prior_prob=prior_prob).cls_logits,
        ATSSHead(C, 3, num_levels=2, prior_prob=prior_prob).cls_logits,
        FCOSHead(C, 3, num_levels=2, prior_prob=prior_prob).cls_logits,
        CenterNetHead(C, 3, head_channels=4, prior_prob=prior_prob).heatmap[-1],
    ]
    for conv in heads:
        torch.testing.assert_close(conv.bias, torch.full_like(conv.bias, bias))


def test_default_priors():
    torch.testing.assert_close(RetinaHead(C, 3).cls_logits.bias, torch.full((27,), -math.log(99.0)))
    torch.testing.assert_close(CenterNetHead(C, 3).heatmap[-1].bias, torch.full((3,), -math.log(9.0)))


def test_heads_at_init_predict_the_prior():
    """Fresh RetinaHead/FCOSHead: class probabilities close to prior_prob everywhere (small tower weights)."""
    feats = _feats()
    for head in (RetinaHead(C, 3), FCOSHead(C, 3, num_levels=3), ATSSHead(C, 3, num_levels=3)):
        p = torch.sigmoid(head(feats).cls_logits)
        torch.testing.assert_close(p, torch.full_like(p, 0.01), atol=2e-3, rtol=0)


def test_atss_head_shapes_order_and_scales():
    a, k = 2, 3
    head = ATSSHead(C, k, num_levels=3, num_anchors=a, num_convs=1)
    _randomise(head)
    with torch.no_grad():
        head.scales.copy_(torch.tensor([1.0, 2.0, 0.5]))
    feats = _feats()
    out = head(feats)
    assert isinstance(out, ATSSOutput)
    r = sum(h * w for h, w in SIZES) * a
    assert out.cls_logits.shape == (2, r, k)
    assert out.box_deltas.shape == (2, r, 4)
    assert out.centerness.shape == (2, r, 1)
    with torch.no_grad():
        box_t = [head.box_tower(f) for f in feats]
        cls_maps = [head.cls_logits(head.cls_tower(f)) for f in feats]
        box_maps = [head.box_deltas(t) for t in box_t]
        ctr_maps = [head.centerness(t) for t in box_t]
    for level, y, x, anchor in [(0, 4, 6, 1), (1, 2, 1, 0), (2, 0, 1, 1)]:
        row = _row(level, y, x, anchor, a)
        scale = [1.0, 2.0, 0.5][level]
        torch.testing.assert_close(out.cls_logits[1, row], cls_maps[level][1, anchor * k:(anchor + 1) * k, y, x])
        torch.testing.assert_close(out.box_deltas[1, row],
                                   scale * box_maps[level][1, anchor * 4:(anchor + 1) * 4, y, x])
        torch.testing.assert_close(out.centerness[1, row], ctr_maps[level][1, anchor:anchor + 1, y, x])


def test_atss_head_defaults_to_group_norm():
    head = ATSSHead(64, 3, num_levels=2)
    assert any(isinstance(m, nn.GroupNorm) for m in head.cls_tower.modules())
    assert head.scales.shape == (2,)


def test_fcos_head_shapes_order_relu_and_scales():
    k = 3
    head = FCOSHead(C, k, num_levels=3, num_convs=2, norm_layer=None)
    _randomise(head)
    with torch.no_grad():
        head.scales.fill_(1.0)
    feats = _feats()
    out = head(feats)
    assert isinstance(out, FCOSOutput)
    r = sum(h * w for h, w in SIZES)
    assert out.cls_logits.shape == (2, r, k)
    assert out.box_distances.shape == (2, r, 4)
    assert out.centerness.shape == (2, r, 1)
    assert (out.box_distances >= 0).all()
    assert (out.box_distances == 0).any() and (out.box_distances > 0).any()  # relu really clips
    with torch.no_grad():
        box_t = [head.box_tower(f) for f in feats]
        dist_maps = [head.box_distances(t) for t in box_t]
        ctr_maps = [head.centerness(t) for t in box_t]
        cls_maps = [head.cls_logits(head.cls_tower(f)) for f in feats]
    for level, y, x, _ in POSITIONS:
        row = _row(level, y, x, 0, 1)
        torch.testing.assert_close(out.cls_logits[0, row], cls_maps[level][0, :, y, x])
        torch.testing.assert_close(out.box_distances[0, row], torch.relu(dist_maps[level][0, :, y, x]))
        torch.testing.assert_close(out.centerness[0, row], ctr_maps[level][0, :, y, x])

    with torch.no_grad():  # per-level scales: 0 silences level 1 only, 3 scales level 2
        head.scales.copy_(torch.tensor([1.0, 0.0, 3.0]))
    scaled = head(feats).box_distances
    n0, n1 = SIZES[0][0] * SIZES[0][1], SIZES[1][0] * SIZES[1][1]
    assert (scaled[:, n0:n0 + n1] == 0).all()
    torch.testing.assert_close(scaled[:, :n0], out.box_distances[:, :n0])
    torch.testing.assert_close(scaled[:, n0 + n1:], 3 * out.box_distances[:, n0 + n1:])
    assert (scaled[:, :n0] > 0).any()


def test_fcos_head_scales_get_gradients():
    head = FCOSHead(C, 3, num_levels=3, num_convs=1)
    _randomise(head)
    head(_feats()).box_distances.sum().backward()
    assert head.scales.grad is not None and (head.scales.grad != 0).all()


def test_centernet_head_shapes_order_and_in_index():
    k = 3
    head = CenterNetHead(C, k, head_channels=4, in_index=1)
    _randomise(head)
    feats = _feats()
    out = head(feats)
    assert isinstance(out, CenterNetOutput)
    h, w = SIZES[1]
    assert out.heatmap_logits.shape == (2, h * w, k)
    assert out.sizes.shape == (2, h * w, 2)
    assert out.offsets.shape == (2, h * w, 2)
    with torch.no_grad():
        heat, size, off = head.heatmap(feats[1]), head.size(feats[1]), head.offset(feats[1])
    for y, x in [(0, 0), (1, 3), (2, 2)]:
        row = y * w + x
        torch.testing.assert_close(out.heatmap_logits[1, row], heat[1, :, y, x])
        torch.testing.assert_close(out.sizes[1, row], size[1, :, y, x])
        torch.testing.assert_close(out.offsets[1, row], off[1, :, y, x])


def test_retina_head_with_group_norm_has_no_conv_bias_in_towers():
    head = RetinaHead(64, 3, norm_layer=group_norm_32)
    for tower in (head.cls_tower, head.box_tower):
        norms = [m for m in tower.modules() if isinstance(m, nn.GroupNorm)]
        convs = [m for m in tower.modules() if isinstance(m, nn.Conv2d)]
        assert len(norms) == len(convs) == 4
        assert all(n.num_groups == 32 for n in norms)
        assert all(c.bias is None for c in convs)
    assert head.cls_logits.bias is not None and head.box_deltas.bias is not None
    plain = RetinaHead(64, 3)
    assert not any(isinstance(m, nn.GroupNorm) for m in plain.modules())
    assert all(m.bias is not None for m in plain.modules() if isinstance(m, nn.Conv2d))


def test_group_norm_32_groups():
    assert group_norm_32(256).num_groups == 32
    assert group_norm_32(48).num_groups == 16
    assert group_norm_32(8).num_groups == 8


def test_zero_conv_towers():
    head = RetinaHead(C, 2, num_anchors=1, num_convs=0)
    out = head(_feats())
    assert out.cls_logits.shape == (2, sum(h * w for h, w in SIZES), 2)


def test_forward_works_with_torch_compile():
    head = FCOSHead(C, 3, num_levels=3, num_convs=1)
    feats = _feats()
    eager = head(feats)
    compiled = torch.compile(head, backend="eager", fullgraph=True)(feats)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("build, match", [
    pytest.param(lambda: RetinaHead(0, 3), "in_channels", id="RetinaHead-in_channels=0"),
    pytest.param(lambda: RetinaHead(C, 0), "num_classes", id="RetinaHead-num_classes=0"),
    pytest.param(lambda: RetinaHead(C, 3, num_anchors=0), "num_anchors", id="RetinaHead-num_anchors=0"),
    pytest.param(lambda: RetinaHead(C, 3, num_convs=-1), "num_convs", id="RetinaHead-num_convs=-1"),
    pytest.param(lambda: RetinaHead(C, 3, prior_prob=0.0), "prior_prob", id="RetinaHead-prior_prob=0.0"),
    pytest.param(lambda: RetinaHead(C, 3, prior_prob=1.0), "prior_prob", id="RetinaHead-prior_prob=1.0"),
    pytest.param(lambda: ATSSHead(C, 0, num_levels=3), "num_classes", id="ATSSHead-num_classes=0"),
    pytest.param(lambda: ATSSHead(C, 3, num_levels=0), "num_levels", id="ATSSHead-num_levels=0"),
    pytest.param(lambda: FCOSHead(0, 3, num_levels=3), "in_channels", id="FCOSHead-in_channels=0"),
    pytest.param(lambda: FCOSHead(C, 3, num_levels=0), "num_levels", id="FCOSHead-num_levels=0"),
    pytest.param(lambda: FCOSHead(C, 0, num_levels=3), "num_classes", id="FCOSHead-num_classes=0"),
    pytest.param(lambda: FCOSHead(C, 3, num_levels=3, num_convs=-2), "num_convs", id="FCOSHead-num_convs=-2"),
    pytest.param(lambda: CenterNetHead(C, 0), "num_classes", id="CenterNetHead-num_classes=0"),
    pytest.param(lambda: CenterNetHead(C, 3, head_channels=0), "head_channels", id="CenterNetHead-head_channels=0"),
    pytest.param(lambda: CenterNetHead(C, 3, prior_prob=1.5), "prior_prob", id="CenterNetHead-prior_prob=1.5"),
])
def test_bad_constructor_arguments_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build()
