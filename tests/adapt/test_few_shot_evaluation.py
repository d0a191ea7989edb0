import pytest
import torch
from torch.utils.data import TensorDataset

from cvzoo.adapt import attribute_probe_accuracy, few_shot_accuracy, nearest_neighbour_predictor

pytestmark = pytest.mark.usefixtures("one_thread")


def _clustered(classes=6, per_class=20, dim=8, spread=0.05):
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(classes, dim, generator=g)
    labels = torch.arange(classes).repeat_interleave(per_class)
    x = centres[labels] + spread * torch.randn(len(labels), dim, generator=g)
    return TensorDataset(x.view(-1, 2, 2, 2), labels), labels


def test_perfect_and_constant_predictors_bracket_the_accuracy():
    dataset, _ = _clustered()

    def oracle(support, support_labels, queries):  # knows the layout: queries are class-major blocks of 3
        return torch.arange(4).repeat_interleave(3)

    acc, ci = few_shot_accuracy(oracle, dataset, n_way=4, k_shot=2, query=3, episodes=10)
    assert acc == 1.0 and ci == 0.0
    acc, _ = few_shot_accuracy(lambda s, sl, q: torch.zeros(len(q), dtype=torch.long), dataset, n_way=4, k_shot=2,
                               query=3, episodes=10)
    assert acc == pytest.approx(0.25)


def test_nearest_neighbour_separates_tight_clusters_and_respects_classes():
    dataset, _ = _clustered()
    acc, _ = few_shot_accuracy(nearest_neighbour_predictor(lambda x: x), dataset, n_way=3, k_shot=1, query=5,
                               episodes=20, classes=[1, 3, 5])
    assert acc == 1.0
    with pytest.raises(ValueError, match="classes \\[7\\]"):
        few_shot_accuracy(nearest_neighbour_predictor(lambda x: x), dataset, classes=[1, 7], n_way=2)


def test_attribute_probe_reads_informative_features_and_not_noise():
    g = torch.Generator().manual_seed(1)
    attribute = torch.randint(0, 4, (400,), generator=g)
    informative = torch.nn.functional.one_hot(attribute, 4).float() + 0.1 * torch.randn(400, 4, generator=g)
    noise = torch.randn(400, 4, generator=g)
    assert attribute_probe_accuracy(informative, attribute) > 0.95
    assert attribute_probe_accuracy(noise, attribute) < 0.4
    assert attribute_probe_accuracy(informative, attribute, hidden_dim=16) > 0.95
    with pytest.raises(ValueError, match="features must be"):
        attribute_probe_accuracy(noise, attribute[:10])
