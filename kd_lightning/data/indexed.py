"""Samples that carry their index, so that cached teacher outputs can be looked up by it."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler
from torch.utils.data.dataloader import default_collate

from kd_lightning.teachers.cache.indices import INDEX_KEY, sample_indices

__all__ = [
    "INDEX_KEY",
    "IndexedCollate",
    "IndexedDataModule",
    "IndexedDataset",
    "indexed_loader",
    "sample_indices",
]


class IndexedDataset(Dataset[tuple[Any, int]]):
    """``dataset[i]`` as the pair ``(sample, i)``; :class:`IndexedCollate` batches such pairs.

    Examples:
        >>> from torch.utils.data import TensorDataset
        >>> IndexedDataset(TensorDataset(torch.tensor([5.0, 6.0])))[1]
        ((tensor(6.),), 1)
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.dataset[index], index


class IndexedCollate:
    """Collate ``(sample, index)`` pairs with ``collate_fn``, then add the indices to the batch.

    A tuple batch ``(x, y)`` becomes ``(x, y, indices)``: :class:`~kd_lightning.BatchAdapter`
    ignores the extra item, so the module's usual batch adapter still finds inputs and labels.
    A dict batch gains the key ``"index"``. :func:`sample_indices` reads them back (as a
    :class:`~kd_lightning.teachers.CachedTeachers` does).

    Examples:
        >>> from torch.utils.data import TensorDataset
        >>> data = IndexedDataset(TensorDataset(torch.zeros(3, 2), torch.tensor([0, 1, 2])))
        >>> x, y, index = IndexedCollate()([data[2], data[0]])
        >>> index
        tensor([2, 0])
    """

    def __init__(self, collate_fn: Callable[[list[Any]], Any] | None = None) -> None:
        self.collate_fn = collate_fn if collate_fn is not None else default_collate

    def __call__(self, pairs: list[tuple[Any, int]]) -> Any:
        batch = self.collate_fn([sample for sample, _ in pairs])
        indices = torch.tensor([index for _, index in pairs], dtype=torch.long)
        if isinstance(batch, Mapping):
            return {**batch, INDEX_KEY: indices}
        if isinstance(batch, Sequence) and not isinstance(batch, str):
            return (*batch, indices)
        raise TypeError(
            f"cannot attach sample indices to a batch of type {type(batch).__name__}: the "
            f"teacher-output cache needs (inputs, targets) tuples or dict batches"
        )


def indexed_loader(loader: DataLoader) -> DataLoader:
    """The same loader (batch size, sampler, workers, collate) over ``(sample, index)`` pairs."""
    custom = not isinstance(loader.sampler, RandomSampler | SequentialSampler)
    return DataLoader(
        IndexedDataset(loader.dataset),
        batch_size=loader.batch_size,
        shuffle=isinstance(loader.sampler, RandomSampler),
        sampler=loader.sampler if custom else None,
        num_workers=loader.num_workers,
        collate_fn=IndexedCollate(loader.collate_fn),
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        persistent_workers=loader.persistent_workers,
    )


class IndexedDataModule(L.LightningDataModule):
    """Wrap a DataModule so its train/val/test batches also carry each sample's index.

    Indices are positions in the split's dataset, the keys of a
    :class:`~kd_lightning.teachers.CachedTeachers` cache built over the same splits.
    Set-up and the batch-transfer hooks are delegated to the wrapped DataModule.

    Args:
        datamodule: the DataModule whose loaders to wrap.

    Examples:
        >>> from kd_lightning.data import SyntheticDataModule
        >>> dm = IndexedDataModule(SyntheticDataModule(num_samples=40, batch_size=4))
        >>> dm.setup("fit")
        >>> x, y, index = next(iter(dm.val_dataloader()))
        >>> index.tolist()
        [0, 1, 2, 3]
    """

    def __init__(self, datamodule: L.LightningDataModule) -> None:
        super().__init__()
        self.datamodule = datamodule

    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    def setup(self, stage: str) -> None:
        self.datamodule.trainer = self.trainer
        self.datamodule.setup(stage)

    def train_dataloader(self) -> DataLoader:
        return indexed_loader(self.datamodule.train_dataloader())

    def val_dataloader(self) -> DataLoader:
        return indexed_loader(self.datamodule.val_dataloader())

    def test_dataloader(self) -> DataLoader:
        return indexed_loader(self.datamodule.test_dataloader())

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.datamodule.on_before_batch_transfer(batch, dataloader_idx)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.datamodule.on_after_batch_transfer(batch, dataloader_idx)
