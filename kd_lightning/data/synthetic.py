"""Gaussian class clusters: a tiny, deterministic classification task for tests and demos."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from kd_lightning.data.base import DictDataset, GeneratedDataModule
from kd_lightning.models.checks import check_non_negative, check_positive

# Expected norm of each class mean: with noise=1 neighbouring clusters overlap.
_MEAN_NORM = 2.0


class SyntheticDataModule(GeneratedDataModule):
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

    Examples:
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
        check_positive(
            num_samples=num_samples,
            in_features=in_features,
            num_classes=num_classes,
            batch_size=batch_size,
        )
        super().__init__(num_samples, batch_size, seed, val_fraction, test_fraction)
        check_non_negative(noise=noise)
        self.save_hyperparameters()
        self.in_features = in_features
        self.num_classes = num_classes
        self.as_dict = as_dict
        self.noise = noise

    def make_dataset(self, x: Tensor, y: Tensor) -> Dataset:
        """A split as ``{"input", "target"}`` dicts with ``as_dict``, else as ``(x, y)`` tuples."""
        return DictDataset(x, y) if self.as_dict else TensorDataset(x, y)

    def generate(self) -> tuple[Tensor, Tensor]:
        """All ``num_samples`` inputs ``(num_samples, in_features)`` and labels, from ``seed``."""
        generator = torch.Generator().manual_seed(self.seed)
        means = torch.randn(self.num_classes, self.in_features, generator=generator)
        means *= _MEAN_NORM / math.sqrt(self.in_features)
        y = torch.arange(self.num_samples) % self.num_classes
        y = y[torch.randperm(self.num_samples, generator=generator)]
        x = means[y] + self.noise * torch.randn(
            self.num_samples, self.in_features, generator=generator
        )
        return x, y
