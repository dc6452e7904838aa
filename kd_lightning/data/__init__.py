"""Data modules: MNIST-1D, synthetic Gaussian clusters, synthetic token sequences, and the MNIST-1D
augmentation."""

from __future__ import annotations

from kd_lightning.data.augment import augment_mnist1d
from kd_lightning.data.mnist1d import MNIST1DDataModule
from kd_lightning.data.sequences import SequenceDataModule
from kd_lightning.data.synthetic import SyntheticDataModule

__all__ = ["MNIST1DDataModule", "SequenceDataModule", "SyntheticDataModule", "augment_mnist1d"]
