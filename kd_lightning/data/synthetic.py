"""Gaussian class clusters: a tiny, deterministic classification task for tests and demos."""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

# Expected norm of each class mean: with noise=1 neighbouring clusters overlap.
_MEAN_NORM = 2.0


class _DictDataset(Dataset[dict[str, Tensor]]):
    """Samples as ``{"input": x, "target": y}`` dicts."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"input": self.x[index], "target": self.y[index]}


class SyntheticDataModule(L.LightningDataModule):
    """Balanced Gaussian clusters ``mean[y] + noise * N(0, I)``, deterministic from ``seed``.

    Class means are drawn from ``N(0, (4 / in_features) I)`` (norm about 2), so with
    ``noise=1`` the classes overlap: learnable well above chance, but not perfectly.
    Samples are split, in generation order, into train, validation and test.

    Args:
        num_samples: Total number of samples over all splits.
        in_features: Dimension of the inputs.
        num_classes: Number of clusters.
        batch_size: Batch size of every dataloader.
        seed: Seed of the means, labels and noise.
        val_fraction: Share of samples in the validation split.
        test_fraction: Share of samples in the test split.
        as_dict: Yield ``{"input": x, "target": y}`` batches instead of ``(x, y)`` tuples.
        noise: Standard deviation of the samples around their class mean.

    Example:
        >>> dm = SyntheticDataModule(num_samples=100, batch_size=8, as_dict=True)
        >>> dm.setup()
        >>> len(dm.train_set), len(dm.val_set), len(dm.test_set)
        (50, 25, 25)
        >>> batch = next(iter(dm.train_dataloader()))
        >>> batch["input"].shape, batch["target"].shape
        (torch.Size([8, 16]), torch.Size([8]))
    """

    def __init__(
        self,
        num_samples: int = 512,
        in_features: int = 16,
        num_classes: int = 4,
        batch_size: int = 64,
        seed: int = 0,
        val_fraction: float = 0.25,
        test_fraction: float = 0.25,
        as_dict: bool = False,
        noise: float = 1.0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("num_samples", num_samples),
            ("in_features", in_features),
            ("num_classes", num_classes),
            ("batch_size", batch_size),
        ):
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
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
        if noise < 0:
            raise ValueError(f"noise must be non-negative, got {noise}")
        self.save_hyperparameters()
        self.num_samples = num_samples
        self.in_features = in_features
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.seed = seed
        self.num_val = num_val
        self.num_test = num_test
        self.as_dict = as_dict
        self.noise = noise
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _dataset(self, x: Tensor, y: Tensor) -> Dataset:
        return _DictDataset(x, y) if self.as_dict else TensorDataset(x, y)

    def setup(self, stage: str | None = None) -> None:
        """Generate the three splits, whatever ``stage``; later calls return immediately."""
        if self.train_set is not None:
            return
        generator = torch.Generator().manual_seed(self.seed)
        means = torch.randn(self.num_classes, self.in_features, generator=generator)
        means *= _MEAN_NORM / math.sqrt(self.in_features)
        y = torch.arange(self.num_samples) % self.num_classes
        y = y[torch.randperm(self.num_samples, generator=generator)]
        x = means[y] + self.noise * torch.randn(
            self.num_samples, self.in_features, generator=generator
        )
        val_start = self.num_samples - self.num_val - self.num_test
        test_start = self.num_samples - self.num_test
        self.train_set = self._dataset(x[:val_start], y[:val_start])
        self.val_set = self._dataset(x[val_start:test_start], y[val_start:test_start])
        self.test_set = self._dataset(x[test_start:], y[test_start:])

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before requesting a dataloader")
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
