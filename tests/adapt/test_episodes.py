import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from cvzoo.adapt import EpisodeCollate, EpisodicBatchSampler, episode_labels, split_classes

pytestmark = pytest.mark.usefixtures("one_thread")

LABELS = torch.arange(6).repeat_interleave(10)  # 6 classes x 10 images


def test_episode_labels_layout():
    assert episode_labels(3, 2, 1).tolist() == [0, 0, 1, 1, 2, 2, 0, 1, 2]
    assert episode_labels(2, 1, 1, tasks=2).tolist() == [0, 1, 0, 1] * 2


def test_sampler_layout_classes_and_disjoint_support_and_queries():
    sampler = EpisodicBatchSampler(LABELS, n_way=3, k_shot=2, query=4, episodes=20, classes=[0, 2, 3, 5])
    batches = list(sampler)
    assert len(batches) == 20 and sampler.batch_size == 18
    seen = set()
    for batch in batches:
        labels = LABELS[batch]
        support, queries = labels[:6].view(3, 2), labels[6:].view(3, 4)
        assert (support == support[:, :1]).all() and (queries == support[:, :1]).all()  # class-major blocks
        assert len(set(support[:, 0].tolist())) == 3 and set(support[:, 0].tolist()) <= {0, 2, 3, 5}
        assert len(set(batch)) == len(batch)  # no image twice in an episode
        seen.update(support[:, 0].tolist())
    assert seen == {0, 2, 3, 5}


def test_sampler_is_reproducible_and_epochs_differ():
    a = EpisodicBatchSampler(LABELS, 2, 1, 1, 5, seed=3)
    b = EpisodicBatchSampler(LABELS, 2, 1, 1, 5, seed=3)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)


def test_tasks_concatenate_episodes():
    sampler = EpisodicBatchSampler(LABELS, 2, 1, 2, 3, tasks=4)
    assert all(len(batch) == 4 * 6 for batch in sampler)


def test_collate_relabels_and_rejects_other_layouts():
    images = torch.randn(len(LABELS), 1, 2, 2)
    dataset = TensorDataset(images, LABELS)
    sampler = EpisodicBatchSampler(LABELS, 3, 2, 1, 2, tasks=2)
    x, y = next(iter(DataLoader(dataset, batch_sampler=sampler, collate_fn=EpisodeCollate(3, 2, 1))))
    assert x.shape == (18, 1, 2, 2) and torch.equal(y, episode_labels(3, 2, 1, tasks=2))
    with pytest.raises(ValueError, match="episode layout"):
        next(iter(DataLoader(dataset, batch_sampler=EpisodicBatchSampler(LABELS, 3, 1, 2, 1),
                             collate_fn=EpisodeCollate(3, 2, 1))))
    with pytest.raises(ValueError, match="multiple of"):
        EpisodeCollate(3, 2, 1)([(images[0], LABELS[0])] * 5)


@pytest.mark.parametrize("kwargs, match", [
    ({"n_way": 7}, "n_way=7 needs at least 7 classes"),
    ({"k_shot": 8, "query": 3}, "k_shot \\+ query = 11"),
    ({"classes": [0, 9]}, "classes \\[9\\] have no images"),
    ({"episodes": 0}, "episodes must be a positive integer"),
])
def test_sampler_errors_name_the_problem(kwargs, match):
    args = {"n_way": 2, "k_shot": 1, "query": 1, "episodes": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        EpisodicBatchSampler(LABELS, **args)


def test_split_classes():
    assert split_classes(10) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])
    assert split_classes(5, 3) == ([0, 1, 2], [3, 4])
    with pytest.raises(ValueError, match="num_base"):
        split_classes(4, 4)


def test_dihedral_classes_rotate_flip_and_relabel():
    from cvzoo.adapt import DihedralClasses

    images = torch.arange(2 * 9, dtype=torch.float32).view(2, 1, 3, 3)
    dataset = TensorDataset(images, torch.tensor([0, 1]))
    expanded = DihedralClasses(dataset, num_classes=2)
    assert len(expanded) == 16 and expanded.labels.tolist() == [c + 2 * t for t in range(8) for c in (0, 1)]
    image, label = expanded[2 * 3 + 1]  # item 1, three quarter turns
    assert int(label) == 7 and torch.equal(image, torch.rot90(images[1], 3, dims=(-2, -1)))
    image, label = expanded[2 * 5]  # item 0, one quarter turn then mirrored
    assert int(label) == 10 and torch.equal(image, torch.rot90(images[0], 1, dims=(-2, -1)).flip(-1))
    assert expanded.classes_of([1]) == [1, 3, 5, 7, 9, 11, 13, 15]
    assert len({expanded[i][0].flatten().tolist().__str__() for i in range(0, 16, 2)}) == 8  # 8 distinct images
    with pytest.raises(ValueError, match="transforms"):
        DihedralClasses(dataset, 2, transforms=3)
