"""Data modules: MNIST-1D, synthetic Gaussian clusters, synthetic token sequences, real text (the
standard library's source, or your files) for causal LMs, and the MNIST-1D augmentation."""

from __future__ import annotations

from kd_lightning.data.augment import augment_mnist1d
from kd_lightning.data.mnist1d import MNIST1DDataModule
from kd_lightning.data.sequences import SequenceDataModule
from kd_lightning.data.synthetic import SyntheticDataModule
from kd_lightning.data.text import TextDataModule
from kd_lightning.data.tokenizers import BPETokenizer, ByteTokenizer

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "MNIST1DDataModule",
    "SequenceDataModule",
    "SyntheticDataModule",
    "TextDataModule",
    "augment_mnist1d",
]
