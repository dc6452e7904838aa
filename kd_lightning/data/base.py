"""The base of the data modules: train, validation and test sets built once, and their loaders."""

from __future__ import annotations

from typing import Generic, TypeVar

import lightning as L
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

DatasetT = TypeVar("DatasetT", bound=Dataset)


class DictDataset(Dataset[dict[str, Tensor]]):
    """Samples as ``{"input": x, "target": y}`` dicts.

    Examples:
        >>> import torch
        >>> DictDataset(torch.tensor([[1.0], [2.0]]), torch.tensor([0, 1]))[1]
        {'input': tensor([2.]), 'target': tensor(1)}
    """

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"input": self.x[index], "target": self.y[index]}


class SplitDataModule(L.LightningDataModule, Generic[DatasetT]):
    """Train, validation and test sets from :meth:`build_splits`, and a loader over each.

    :meth:`setup` builds the three sets the first time it is called, whatever the stage. Every
    loader has the same ``batch_size`` and ``num_workers`` (persistent when there are any); only
    the training loader shuffles. Subclasses check the arguments before passing them on.

    Args:
        batch_size: Batch size of every dataloader.
        num_workers: Dataloader worker processes.

    Examples:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> class Ramp(SplitDataModule[TensorDataset]):
        ...     def build_splits(self):
        ...         ramp = TensorDataset(torch.arange(10.0))
        ...         return ramp, ramp, ramp
        >>> dm = Ramp(batch_size=4)
        >>> dm.setup()
        >>> [len(x) for (x,) in dm.val_dataloader()]
        [4, 4, 2]
    """

    def __init__(self, batch_size: int, num_workers: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_set: DatasetT | None = None
        self.val_set: DatasetT | None = None
        self.test_set: DatasetT | None = None

    def build_splits(self) -> tuple[DatasetT, DatasetT, DatasetT]:
        """The train, validation and test sets."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Build the three sets, whatever ``stage``; later calls return immediately."""
        if self.train_set is None:
            self.train_set, self.val_set, self.test_set = self.build_splits()

    def _loader(self, dataset: DatasetT | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before requesting a dataloader")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


class GeneratedDataModule(SplitDataModule[Dataset]):
    """``num_samples`` samples from :meth:`generate`, split in generation order by fraction.

    The first samples train, the next ``round(num_samples * val_fraction)`` validate and the last
    ``round(num_samples * test_fraction)`` test; :meth:`make_dataset` wraps each split, by default
    in a :class:`DictDataset`.

    Args:
        num_samples: Total number of samples over all splits.
        batch_size: Batch size of every dataloader.
        seed: Seed of the generated data.
        val_fraction: Share of samples in the validation split.
        test_fraction: Share of samples in the test split.

    Examples:
        >>> import torch
        >>> class Ramp(GeneratedDataModule):
        ...     def generate(self):
        ...         return torch.arange(8.0), torch.arange(8)
        >>> dm = Ramp(num_samples=8, batch_size=4, seed=0, val_fraction=0.25, test_fraction=0.25)
        >>> dm.setup()
        >>> dm.test_set.x
        tensor([6., 7.])
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        val_fraction: float,
        test_fraction: float,
    ) -> None:
        for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= fraction < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {fraction}")
        num_val = round(num_samples * val_fraction)
        num_test = round(num_samples * test_fraction)
        if num_val + num_test >= num_samples:
            raise ValueError(
                f"val_fraction={val_fraction} and test_fraction={test_fraction} leave no "
                f"training samples out of num_samples={num_samples}"
            )
        super().__init__(batch_size)
        self.num_samples = num_samples
        self.seed = seed
        self.num_val = num_val
        self.num_test = num_test

    def generate(self) -> tuple[Tensor, Tensor]:
        """All ``num_samples`` inputs and targets, in order, from ``seed``."""
        raise NotImplementedError

    def make_dataset(self, x: Tensor, y: Tensor) -> Dataset:
        """The dataset of one split's inputs and targets."""
        return DictDataset(x, y)

    def build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        x, y = self.generate()
        val_start = self.num_samples - self.num_val - self.num_test
        test_start = self.num_samples - self.num_test
        return (
            self.make_dataset(x[:val_start], y[:val_start]),
            self.make_dataset(x[val_start:test_start], y[val_start:test_start]),
            self.make_dataset(x[test_start:], y[test_start:]),
        )
