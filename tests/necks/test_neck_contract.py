"""Contract every neck keeps: declared feature_info vs real outputs on odd sizes, finite, backward, compile."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cvzoo.necks import FPN, PAN, BiFPN
from cvzoo.types import FeatureInfo

IMAGE = (97, 131)
INFO = (FeatureInfo(6, 8), FeatureInfo(10, 16), FeatureInfo(12, 32))
CEIL = tuple((math.ceil(IMAGE[0] / f.stride), math.ceil(IMAGE[1] / f.stride)) for f in INFO)  # 13x17, 7x9, 4x5
FLOOR = tuple((IMAGE[0] // f.stride, IMAGE[1] // f.stride) for f in INFO)  # 12x16, 6x8, 3x4
OUT = 8

NECKS = {
    "fpn": lambda: FPN(INFO, OUT),
    "fpn-p6p7-output": lambda: FPN(INFO, OUT, extra_levels=2, extra_source="output"),
    "fpn-p6p7-input": lambda: FPN(INFO, OUT, extra_levels=2, extra_source="input"),
    "fpn-maxpool": lambda: FPN(INFO, OUT, extra_levels=1, extra_mode="maxpool"),
    "fpn-bn-relu": lambda: FPN(INFO, OUT, extra_levels=1, norm_layer=nn.BatchNorm2d, act_layer=nn.ReLU),
    "pan": lambda: PAN(INFO, OUT),
    "pan-p6p7": lambda: PAN(INFO, OUT, extra_levels=2),
    "pan-maxpool": lambda: PAN(INFO, OUT, extra_levels=1, extra_mode="maxpool"),
    "bifpn": lambda: BiFPN(INFO, OUT, num_repeats=2, extra_levels=2),
    "bifpn-no-extra": lambda: BiFPN(INFO, OUT, num_repeats=1, extra_levels=0),
    "bifpn-no-norm": lambda: BiFPN(INFO, OUT, num_repeats=1, extra_levels=1, norm_layer=None),
}
EXPECTED_LEVELS = {
    "fpn": 3, "fpn-p6p7-output": 5, "fpn-p6p7-input": 5, "fpn-maxpool": 4, "fpn-bn-relu": 4,
    "pan": 3, "pan-p6p7": 5, "pan-maxpool": 4, "bifpn": 5, "bifpn-no-extra": 3, "bifpn-no-norm": 4,
}


def _feats(sizes, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, f.channels, h, w, generator=g) for f, (h, w) in zip(INFO, sizes)]


@pytest.mark.parametrize("name", list(NECKS))
def test_declared_feature_info(name):
    neck = NECKS[name]()
    info = neck.feature_info
    assert len(info) == EXPECTED_LEVELS[name] == neck.num_levels
    assert all(isinstance(f, FeatureInfo) for f in info)
    assert all(f.channels == OUT for f in info)
    # input levels keep their strides, each extra level doubles the last one
    assert [f.stride for f in info] == [8 * 2**i for i in range(len(info))]


@pytest.mark.parametrize("sizes", [CEIL, FLOOR], ids=["ceil", "floor"])
@pytest.mark.parametrize("name", list(NECKS))
def test_outputs_match_declared_feature_info_on_odd_sizes(name, sizes):
    torch.manual_seed(0)
    neck = NECKS[name]().eval()
    with torch.no_grad():
        out = neck(_feats(sizes))
    assert isinstance(out, list)
    assert len(out) == len(neck.feature_info)
    for i, (o, f) in enumerate(zip(out, neck.feature_info)):
        assert o.shape[:2] == (2, f.channels), (i, o.shape, f)
        if i < len(sizes):  # input levels keep their input's size exactly
            assert tuple(o.shape[-2:]) == sizes[i], (i, o.shape)
        expected = (math.ceil(IMAGE[0] / f.stride), math.ceil(IMAGE[1] / f.stride))
        for got, want in zip(o.shape[-2:], expected):
            assert abs(got - want) <= 1, (i, tuple(o.shape[-2:]), expected, f.stride)
        assert torch.isfinite(o).all(), i


@pytest.mark.parametrize("name", list(NECKS))
def test_backward_reaches_every_parameter(name):
    torch.manual_seed(0)
    neck = NECKS[name]().train()
    out = neck(_feats(FLOOR))
    # random projections: a plain mean of a BatchNorm output has zero gradient w.r.t. what precedes it
    g = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o in out)
    loss.backward()
    for pname, p in neck.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", ["fpn-p6p7-output", "fpn-p6p7-input", "fpn-maxpool", "pan-p6p7", "bifpn"])
def test_compile_fullgraph_matches_eager(name):
    torch._dynamo.reset()
    torch.manual_seed(0)
    neck = NECKS[name]().eval()
    feats = _feats(CEIL)
    with torch.no_grad():
        eager = neck(feats)
        compiled = torch.compile(neck, backend="eager", fullgraph=True)(feats)
    assert len(compiled) == len(eager)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["fpn", "pan", "bifpn"])
def test_state_dict_round_trip(name):
    torch.manual_seed(0)
    a = NECKS[name]().eval()
    torch.manual_seed(1)
    b = NECKS[name]().eval()
    b.load_state_dict(a.state_dict())
    feats = _feats(CEIL)
    with torch.no_grad():
        for x, y in zip(a(feats), b(feats)):
            torch.testing.assert_close(x, y)
