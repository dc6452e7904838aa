"""MNIST-1D (Greydanus 2020, "Scaling down deep learning"), generated locally."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from kd_lightning.data.augment import augment_mnist1d
from kd_lightning.data.base import SplitDataModule
from kd_lightning.models.checks import check_non_negative, check_positive

_ARRAY_KEYS = ("x", "y", "x_test", "y_test")


def _generate(num_samples: int, seed: int) -> dict[str, np.ndarray]:
    """Generate MNIST-1D without touching the global numpy or ``random`` RNG state."""
    from mnist1d import data as mnist1d_data  # imported lazily: it pulls in matplotlib

    args = mnist1d_data.get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:  # make_dataset reseeds numpy's and random's global RNGs; it does not use torch's
        dataset = mnist1d_data.make_dataset(args)
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    return {
        "x": dataset["x"].astype(np.float32),
        "y": dataset["y"].astype(np.int64),
        "x_test": dataset["x_test"].astype(np.float32),
        "y_test": dataset["y_test"].astype(np.int64),
    }


def _save_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` as ``.npz`` through a temporary file and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            # numpy's stubs mistake **arrays for its allow_pickle flag (numpy >= 2.1).
            np.savez(file, **arrays)  # type: ignore[arg-type]
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class MNIST1DDataModule(SplitDataModule[TensorDataset]):
    """MNIST-1D splits: the generator's 80/20 train/test split, the last training samples as validation.

    The data is generated with ``mnist1d.data.make_dataset`` (never downloaded); when
    ``data_dir`` is set it is cached there as ``mnist1d_n{num_samples}_seed{seed}.npz``.
    Inputs are float32 ``(N, 40)``, targets int64.

    Args:
        data_dir: Cache directory; None generates the data in memory every time.
        num_samples: Total number of samples, train and test together.
        seed: Seed of the generator.
        val_size: Number of trailing training samples held out for validation.
        batch_size: Batch size of every dataloader.
        num_workers: Dataloader worker processes.
        augment: Apply :func:`augment_mnist1d` to training batches.

    Examples:
        >>> dm = MNIST1DDataModule(num_samples=100, val_size=10, batch_size=16)
        >>> dm.setup("fit")
        >>> len(dm.train_set), len(dm.val_set), len(dm.test_set)
        (70, 10, 20)
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> x.shape, x.dtype, y.dtype
        (torch.Size([16, 40]), torch.float32, torch.int64)
    """

    def __init__(
        self,
        data_dir: str | None = None,
        num_samples: int = 5000,
        seed: int = 42,
        val_size: int = 500,
        batch_size: int = 100,
        num_workers: int = 0,
        augment: bool = False,
    ) -> None:
        if num_samples < 10:
            raise ValueError(f"num_samples must be at least 10 (one per class), got {num_samples}")
        check_non_negative(val_size=val_size)
        check_positive(batch_size=batch_size)
        check_non_negative(num_workers=num_workers)
        super().__init__(batch_size, num_workers)
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.num_samples = num_samples
        self.seed = seed
        self.val_size = val_size
        self.augment = augment
        self.num_classes = 10
        self.in_features = 40

    @property
    def cache_path(self) -> Path | None:
        """Location of the ``.npz`` cache, or None without ``data_dir``."""
        if self.data_dir is None:
            return None
        return Path(self.data_dir) / f"mnist1d_n{self.num_samples}_seed{self.seed}.npz"

    def _load_arrays(self) -> dict[str, np.ndarray]:
        """Read the cache if present; otherwise generate the data and cache it if configured."""
        path = self.cache_path
        if path is not None and path.exists():
            with np.load(path) as cached:
                return {key: cached[key] for key in _ARRAY_KEYS}
        arrays = _generate(self.num_samples, self.seed)
        if path is not None:
            _save_atomically(path, arrays)
        return arrays

    def prepare_data(self) -> None:
        """Generate and cache the data once, when ``data_dir`` is set."""
        if self.cache_path is not None:
            self._load_arrays()

    def build_splits(self) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
        """Train on the generator's training samples but the last ``val_size``, which validate;
        test on its test samples."""
        arrays = self._load_arrays()
        x, y = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"])
        if self.val_size >= len(x):
            raise ValueError(
                f"val_size={self.val_size} must be smaller than the {len(x)} training samples"
            )
        split = len(x) - self.val_size
        return (
            TensorDataset(x[:split], y[:split]),
            TensorDataset(x[split:], y[split:]),
            TensorDataset(torch.from_numpy(arrays["x_test"]), torch.from_numpy(arrays["y_test"])),
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Augment ``(x, y)`` training batches when ``augment`` is on; pass others through."""
        if self.augment and self.trainer is not None and self.trainer.training:
            x, y = batch
            return augment_mnist1d(x), y
        return batch
