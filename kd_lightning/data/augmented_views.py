"""A fixed number of seeded augmented views per sample, so that teacher outputs on them can be cached."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

#: ``augment(inputs, generator) → augmented inputs`` for one sample.
ViewAugment = Callable[[Tensor, torch.Generator], Tensor]


class AugmentedViews(Dataset[tuple[Any, ...]]):
    """``num_views`` augmented copies of each ``(inputs, target)`` sample, each with its own seed.

    Item ``j`` is view ``j % num_views`` of sample ``j // num_views``: its inputs go through
    ``augment`` with a generator seeded by ``(seed, j)``, so item ``j`` is the same every time it
    is read. That makes teacher outputs on augmented data cacheable: one cached row per view.

    Args:
        dataset: a map-style dataset of ``(inputs, target, ...)`` tuples.
        augment: ``augment(inputs, generator)`` for one sample; must draw its randomness from
            ``generator``.
        num_views: views per sample.
        seed: the seed of the views.

    Examples:
        >>> from torch.utils.data import TensorDataset
        >>> noisy = lambda x, g: x + torch.randn(x.shape, generator=g)
        >>> views = AugmentedViews(TensorDataset(torch.zeros(3, 2), torch.arange(3)), noisy, 4)
        >>> len(views), views[5][1].item()  # view 1 of sample 1
        (12, 1)
        >>> torch.equal(views[5][0], views[5][0]), torch.equal(views[4][0], views[5][0])
        (True, False)
    """

    def __init__(self, dataset: Dataset, augment: ViewAugment, num_views: int, seed: int = 0):
        if isinstance(num_views, bool) or not isinstance(num_views, int) or num_views < 1:
            raise ValueError(f"num_views must be a positive integer, got {num_views!r}")
        self.dataset = dataset
        self.augment = augment
        self.num_views = num_views
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset) * self.num_views  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        sample = self.dataset[index // self.num_views]
        if not isinstance(sample, tuple | list) or len(sample) < 2:
            raise TypeError(
                f"AugmentedViews needs (inputs, target) samples, got {type(sample).__name__}"
            )
        generator = torch.Generator().manual_seed((self.seed << 32) + index)
        return (self.augment(sample[0], generator), *sample[1:])


class OneViewPerSample(Sampler[int]):
    """Each epoch, every sample once, in random order, as one of its views chosen at random.

    Indices address an :class:`AugmentedViews` dataset; randomness comes from torch's global
    generator, which ``seed_everything`` seeds (as for ``shuffle=True``).

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> sorted(index // 3 for index in OneViewPerSample(4, 3))
        [0, 1, 2, 3]
    """

    def __init__(self, num_samples: int, num_views: int) -> None:
        self.num_samples = num_samples
        self.num_views = num_views

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.num_samples)
        views = torch.randint(self.num_views, (self.num_samples,))
        return iter((order * self.num_views + views).tolist())


class AugmentedViewsDataModule(L.LightningDataModule):
    """Train on ``num_views`` fixed, seeded augmented views per sample instead of fresh ones.

    The training loader reads :class:`AugmentedViews` of the wrapped DataModule's training set
    with :class:`OneViewPerSample` (an epoch still sees each sample once); validation and test
    loaders are the wrapped ones. The wrapped DataModule's batch-transfer hooks are not applied,
    so its own random augmentation is replaced, not added to.

    Args:
        datamodule: the DataModule to wrap.
        augment: ``augment(inputs, generator)`` for one sample.
        num_views: views per training sample.
        seed: the seed of the views.
    """

    def __init__(
        self, datamodule: L.LightningDataModule, augment: ViewAugment, num_views: int, seed: int = 0
    ) -> None:
        super().__init__()
        self.datamodule = datamodule
        self.augment = augment
        self.num_views = num_views
        self.seed = seed

    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    def setup(self, stage: str) -> None:
        self.datamodule.setup(stage)

    def train_dataloader(self) -> DataLoader:
        loader = self.datamodule.train_dataloader()
        views = AugmentedViews(loader.dataset, self.augment, self.num_views, self.seed)
        return DataLoader(
            views,
            batch_size=loader.batch_size,
            sampler=OneViewPerSample(len(loader.dataset), self.num_views),  # type: ignore[arg-type]
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            drop_last=loader.drop_last,
        )

    def val_dataloader(self) -> DataLoader:
        return self.datamodule.val_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self.datamodule.test_dataloader()
