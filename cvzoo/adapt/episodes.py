"""Episodes for few-shot learning: N classes, K labelled support images and Q query images of each.

An episode is one batch laid out support first, then queries, each block class-major:

    support: class 0 x K, class 1 x K, ..., class N-1 x K   (rows 0 .. N*K-1)
    queries: class 0 x Q, ..., class N-1 x Q                 (rows N*K .. N*(K+Q)-1)

with labels relabelled 0..N-1 in the order the episode drew its classes (`episode_labels`). A batch of T
episodes is T such blocks one after another.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler, default_collate

from cvzoo.adapt._checks import check_positive_int


def episode_labels(n_way: int, k_shot: int, query: int, *, tasks: int = 1, device: torch.device | str | None = None
                   ) -> Tensor:
    """The relabelled classes of `tasks` episodes in the layout above: (tasks * N * (K + Q),) int64."""
    one = torch.cat([torch.arange(n_way, device=device).repeat_interleave(k_shot),
                     torch.arange(n_way, device=device).repeat_interleave(query)])
    return one.repeat(tasks)


def _as_labels(labels: object) -> Tensor:
    if isinstance(labels, Tensor):
        out = labels
    else:
        try:
            out = torch.as_tensor(list(labels))  # type: ignore[arg-type]
        except (TypeError, ValueError) as err:
            raise ValueError(f"labels must be a sequence of integer class labels, got {type(labels).__name__}") from err
    if out.ndim != 1 or out.is_floating_point():
        raise ValueError(f"labels must be a 1-D integer sequence, got shape {tuple(out.shape)} dtype {out.dtype}")
    return out.long()


class EpisodicBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices, one `tasks`-episode batch at a time (N-way, K-shot, Q queries a class).

    `labels` are the dataset's class labels in index order; `classes` restricts the episodes to some classes
    (e.g. the base classes for training, the held-out classes for testing); every one of them needs at least
    K + Q images. Classes and images are drawn without replacement within an episode, from a generator seeded
    with `seed` + the epoch (`set_epoch`), so the episodes are reproducible. Pair it with `EpisodeCollate` in
    a DataLoader (`batch_sampler=`) to get the relabelled targets.
    """

    def __init__(self, labels: Sequence[int] | Tensor, n_way: int, k_shot: int, query: int, episodes: int, *,
                 classes: Sequence[int] | None = None, tasks: int = 1, seed: int = 0) -> None:
        for name, value in (("n_way", n_way), ("k_shot", k_shot), ("query", query), ("episodes", episodes),
                            ("tasks", tasks)):
            check_positive_int(name, value)
        labels = _as_labels(labels)
        present = sorted(set(labels.tolist()))
        classes = present if classes is None else [int(c) for c in classes]
        missing = [c for c in classes if c not in present]
        if missing:
            raise ValueError(f"classes {missing} have no images (the labels hold {present})")
        if len(classes) < n_way:
            raise ValueError(f"n_way={n_way} needs at least {n_way} classes, got {len(classes)}: {classes}")
        self.by_class = {c: (labels == c).nonzero(as_tuple=True)[0] for c in classes}
        short = {c: len(i) for c, i in self.by_class.items() if len(i) < k_shot + query}
        if short:
            raise ValueError(f"k_shot + query = {k_shot + query} images a class are needed, but classes have only "
                             f"{short}")
        self.classes = classes
        self.n_way, self.k_shot, self.query, self.episodes, self.tasks = n_way, k_shot, query, episodes, tasks
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def batch_size(self) -> int:
        return self.tasks * self.n_way * (self.k_shot + self.query)

    def __len__(self) -> int:
        return self.episodes

    def sample_episode(self, generator: torch.Generator) -> tuple[list[int], list[int]]:
        """(dataset indices in the episode layout, the N original classes in episode order)."""
        chosen = [self.classes[i] for i in torch.randperm(len(self.classes), generator=generator)[:self.n_way]]
        support, queries = [], []
        for c in chosen:  # N classes: a loop over the episode's classes, not images
            pool = self.by_class[c]
            picks = pool[torch.randperm(len(pool), generator=generator)[:self.k_shot + self.query]]
            support += picks[:self.k_shot].tolist()
            queries += picks[self.k_shot:].tolist()
        return support + queries, chosen

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        for _ in range(self.episodes):
            batch: list[int] = []
            for _ in range(self.tasks):
                batch += self.sample_episode(g)[0]
            yield batch


class EpisodeCollate:
    """Collates an episodic batch of (image, label) samples to (images, episode labels 0..N-1).

    It checks that the original labels follow the layout (the same class in each support and query block),
    so a sampler that does not match `n_way`/`k_shot`/`query` fails here rather than training on noise.
    """

    def __init__(self, n_way: int, k_shot: int, query: int) -> None:
        for name, value in (("n_way", n_way), ("k_shot", k_shot), ("query", query)):
            check_positive_int(name, value)
        self.n_way, self.k_shot, self.query = n_way, k_shot, query

    def __call__(self, batch: list) -> tuple[Tensor, Tensor]:
        images, labels = default_collate(batch)
        per_task = self.n_way * (self.k_shot + self.query)
        if labels.ndim != 1 or labels.shape[0] % per_task:
            raise ValueError(f"an episodic batch of {self.n_way}-way {self.k_shot}-shot episodes with {self.query} "
                             f"queries has a multiple of {per_task} images, got {tuple(labels.shape)} labels")
        tasks = labels.shape[0] // per_task
        relabelled = episode_labels(self.n_way, self.k_shot, self.query, tasks=tasks)
        original = labels.view(tasks, per_task)
        split = self.n_way * self.k_shot
        classes = original[:, :split:self.k_shot]  # (T, N): each support block's class
        expected = torch.cat([classes.repeat_interleave(self.k_shot, 1), classes.repeat_interleave(self.query, 1)], 1)
        if not torch.equal(expected, original):
            raise ValueError("the batch does not follow the episode layout (support blocks of k_shot, then query "
                             "blocks of query images, class-major); build it with EpisodicBatchSampler of the same "
                             "n_way, k_shot and query")
        return images, relabelled


def split_classes(num_classes: int, num_base: int | None = None) -> tuple[list[int], list[int]]:
    """(base classes to train on, novel classes held out for testing): the first `num_base` (default: half,
    rounded up) and the rest."""
    check_positive_int("num_classes", num_classes)
    num_base = (num_classes + 1) // 2 if num_base is None else num_base
    if isinstance(num_base, bool) or not isinstance(num_base, int) or not 1 <= num_base < num_classes:
        raise ValueError(f"num_base must be in [1, {num_classes - 1}], got {num_base!r}")
    return list(range(num_base)), list(range(num_base, num_classes))


class DihedralClasses(Dataset):
    """A labelled image set with each class multiplied by the rotations (and flips) of the square: item
    `t * len(dataset) + i` is item i rotated by `t % 4` quarter turns (then mirrored when `t >= 4`), labelled
    `label + t * num_classes`. The few-shot recipe for small class counts (Omniglot's rotated classes, Santoro
    et al. 2016; Snell et al. 2017): a rotated digit is a new shape, so metric learning sees `transforms` times
    as many classes and learns features that are less tied to the few base classes.

    `labels` lists the new labels in index order (what `EpisodicBatchSampler` reads); `classes_of(classes)`
    maps original classes to all their transformed copies.
    """

    def __init__(self, dataset: Dataset, num_classes: int, transforms: int = 8) -> None:
        check_positive_int("num_classes", num_classes)
        if transforms not in (1, 2, 4, 8):
            raise ValueError(f"transforms must be 1, 2, 4 (rotations) or 8 (rotations and flips), got {transforms!r}")
        labels = getattr(dataset, "labels", None)
        if not isinstance(labels, Tensor):
            labels = torch.stack([torch.as_tensor(dataset[i][1]) for i in range(len(dataset))])  # type: ignore[arg-type]
        self.dataset, self.num_classes, self.transforms = dataset, num_classes, transforms
        self.labels = torch.cat([labels.long() + t * num_classes for t in range(transforms)])

    def classes_of(self, classes: Sequence[int]) -> list[int]:
        return [c + t * self.num_classes for t in range(self.transforms) for c in classes]

    def __len__(self) -> int:
        return len(self.dataset) * self.transforms  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        t, i = divmod(index, len(self.dataset))  # type: ignore[arg-type]
        image, label = self.dataset[i]
        image = torch.rot90(image, t % 4, dims=(-2, -1))
        if t >= 4:
            image = image.flip(-1)
        return image, torch.as_tensor(label).long() + t * self.num_classes
