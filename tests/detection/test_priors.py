"""cvzoo.detection.priors against torchvision's AnchorGenerator and closed forms."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList

from cvzoo.detection.priors import AnchorGenerator, PointGenerator, retinanet_anchor_sizes

STRIDES = (8, 16, 32, 64, 128)
RATIOS = (0.5, 1.0, 2.0)


def _tv_retinanet_sizes():
    # exactly torchvision.models.detection.retinanet._default_anchorgen
    return tuple((x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in [32, 64, 128, 256, 512])


def test_retinanet_anchor_sizes_equal_torchvision():
    assert retinanet_anchor_sizes((32, 64, 128, 256, 512)) == _tv_retinanet_sizes()


@pytest.mark.parametrize("image_hw", [(256, 384), (128, 128)])
def test_anchor_generator_equals_torchvision(image_hw):
    h, w = image_hw  # divisible by the largest stride
    sizes = [(h // s, w // s) for s in STRIDES]
    ours = AnchorGenerator(retinanet_anchor_sizes((32, 64, 128, 256, 512)), RATIOS, STRIDES)(sizes)
    tv = TVAnchorGenerator(_tv_retinanet_sizes(), (RATIOS,) * len(STRIDES))
    image_list = ImageList(torch.zeros(2, 3, h, w), [(h, w), (h, w)])
    feats = [torch.zeros(2, 1, fh, fw) for fh, fw in sizes]
    expected = tv(image_list, feats)
    assert ours.shape == (sum(fh * fw for fh, fw in sizes) * 9, 4)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected[0], rtol=0, atol=0)


def test_anchor_generator_row_order_level_y_x_anchor():
    sizes = [(3, 4), (2, 2)]
    gen = AnchorGenerator(((10, 20), (40, 80)), (0.5, 1.0, 2.0), (8, 16))
    anchors = gen(sizes)
    a = gen.num_anchors
    assert a == 6
    row = 0
    for level, ((h, w), stride) in enumerate(zip(sizes, (8, 16))):
        level_sizes = ((10, 20), (40, 80))[level]
        for y in range(h):
            for x in range(w):
                for ratio in (0.5, 1.0, 2.0):  # ratio-major, size-minor
                    for s in level_sizes:
                        hr = ratio ** 0.5
                        half_w, half_h = round(s / hr / 2), round(s * hr / 2)
                        expected = [x * stride - half_w, y * stride - half_h, x * stride + half_w, y * stride + half_h]
                        assert anchors[row].tolist() == expected, (level, y, x, ratio, s)
                        row += 1
    assert row == anchors.shape[0]


def test_anchor_generator_scales_and_offset():
    gen = AnchorGenerator(((16,),), (1.0,), (8,), scales=(1.0, 2.0), offset=0.5)
    anchors = gen([(1, 2)])
    # centres at (x + 0.5) * 8; sizes 16 and 32
    expected = torch.tensor([[-4.0, -4.0, 12.0, 12.0], [-12.0, -12.0, 20.0, 20.0],
                             [4.0, -4.0, 20.0, 12.0], [-4.0, -12.0, 28.0, 20.0]])
    torch.testing.assert_close(anchors, expected)


def test_anchor_generator_rejects_bad_config():
    with pytest.raises(ValueError, match="levels"):
        AnchorGenerator(((32,), (64,)), (1.0,), (8,))
    with pytest.raises(ValueError, match="aspect_ratios"):
        AnchorGenerator(((32,),), (0.0, 1.0), (8,))


@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_point_generator_closed_form(offset):
    sizes = [(3, 5), (2, 3), (1, 1)]
    strides = (8, 16, 32)
    points, point_strides = PointGenerator(strides, offset=offset)(sizes)
    expected_p, expected_s = [], []
    for (h, w), s in zip(sizes, strides):
        for y in range(h):
            for x in range(w):
                expected_p.append([(x + offset) * s, (y + offset) * s])
                expected_s.append(float(s))
    assert points.tolist() == expected_p
    assert point_strides.tolist() == expected_s
    assert points.dtype == point_strides.dtype == torch.float32
    gen = PointGenerator(strides, offset=offset)
    assert gen.num_levels == 3 and gen.num_anchors == 1


def test_compiled_priors_come_from_the_opaque_operator_and_equal_eager():
    """Under torch.compile the priors are one `cvzoo::grid_priors` call (the compiler must not inline their
    index arithmetic into the IoU loops); values equal the eager ones, and the fake kernel passes opcheck."""
    anchors = AnchorGenerator(retinanet_anchor_sizes((32, 64, 128)), RATIOS, (8, 16, 32))
    points = PointGenerator((8, 16, 32))
    sizes = [(5, 7), (3, 4), (2, 2)]
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    got_anchors = torch.compile(lambda: anchors(sizes), backend=backend, fullgraph=True)()
    got_points, got_strides = torch.compile(lambda: points(sizes), backend=backend, fullgraph=True)()
    torch._dynamo.reset()
    assert torch.equal(got_anchors, anchors(sizes))
    eager_points, eager_strides = points(sizes)
    assert torch.equal(got_points, eager_points) and torch.equal(got_strides, eager_strides)
    assert len(graphs) == 2
    for gm in graphs:
        calls = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        assert calls.count("cvzoo.grid_priors.default") == 1
    if hasattr(torch.library, "opcheck"):
        base = anchors.base_anchors.clone()
        torch.library.opcheck(torch.ops.cvzoo.grid_priors.default, ([5, 7, 3, 4, 2, 2], [8, 16, 32], 0.0, base))
