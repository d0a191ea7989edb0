"""cvzoo.explain.sanity: Spearman against scipy, the pointing game on hand-made maps, the randomisation test."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cvzoo.explain.sanity import cascading_randomization, pointing_game, spearman

stats = pytest.importorskip("scipy.stats")


def test_spearman_matches_scipy():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(5, 300, generator=g)
    b = a + 0.5 * torch.rand(5, 300, generator=g)
    got = spearman(a, b)
    for i in range(5):
        assert got[i].item() == pytest.approx(stats.spearmanr(a[i].numpy(), b[i].numpy()).statistic, abs=1e-9)
    assert spearman(a, a).tolist() == pytest.approx([1.0] * 5)
    assert spearman(a, -a).tolist() == pytest.approx([-1.0] * 5)
    with pytest.raises(ValueError, match="same shape"):
        spearman(a, b[:, :10])


def test_pointing_game_on_hand_made_maps():
    maps = torch.zeros(3, 20, 30)
    maps[0, 5, 7] = 1.0  # point (7.5, 5.5)
    maps[1, 15, 25] = 1.0  # point (25.5, 15.5)
    maps[2, 0, 0] = 1.0  # point (0.5, 0.5)
    boxes = [torch.tensor([[6.0, 4.0, 9.0, 6.0]]), torch.tensor([[0.0, 0.0, 5.0, 5.0], [20.0, 10.0, 25.0, 15.0]]),
             torch.zeros(0, 4)]
    assert pointing_game(maps, boxes).tolist() == [True, False, False]
    assert pointing_game(maps, boxes, tolerance=1.0).tolist() == [True, True, False]  # 25.5 <= 25 + 1
    with pytest.raises(ValueError, match="one"):
        pointing_game(maps, boxes[:2])
    with pytest.raises(ValueError, match="tolerance"):
        pointing_game(maps, boxes, tolerance=-1)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


def test_randomisation_separates_weight_dependent_maps_from_weight_blind_ones():
    torch.manual_seed(0)
    model = _Net()
    images = torch.rand(4, 3, 16, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def activation_map(m, x):  # depends on the weights
        with torch.no_grad():
            return m(x).relu().mean(1)

    def edge_map(m, x):  # ignores the model: an edge detector
        return (x[..., :, 1:] - x[..., :, :-1]).abs().mean(1)

    dependent = cascading_randomization(model, activation_map, images, ["conv2", "conv1"])
    blind = cascading_randomization(model, edge_map, images, ["conv2", "conv1"])
    assert [name for name, _ in dependent] == ["conv2", "conv1"]
    assert all(r < 0.5 for _, r in dependent), dependent
    assert all(r == pytest.approx(1.0) for _, r in blind)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # randomised a copy
    with pytest.raises(ValueError, match="not modules"):
        cascading_randomization(model, edge_map, images, ["conv3"])
