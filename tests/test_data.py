"""Tests for the MNIST-1D and synthetic data modules and the MNIST-1D augmentation."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import mnist1d.data
import numpy as np
import pytest
import torch

from kd_lightning.data import MNIST1DDataModule, SyntheticDataModule, augment_mnist1d

# Small datasets generate in a fraction of a second; the default 5000 samples take ~5 s.
SMALL = 200


@pytest.fixture(scope="session")
def mnist1d_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory holding the default MNIST-1D cache, generated once per session."""
    data_dir = tmp_path_factory.mktemp("mnist1d")
    MNIST1DDataModule(data_dir=str(data_dir)).prepare_data()
    return data_dir


@pytest.fixture(scope="session")
def mnist1d_dm(mnist1d_dir: Path) -> MNIST1DDataModule:
    dm = MNIST1DDataModule(data_dir=str(mnist1d_dir))
    dm.setup("fit")
    return dm


def tensors(dm: MNIST1DDataModule) -> list[torch.Tensor]:
    return [t for split in (dm.train_set, dm.val_set, dm.test_set) for t in split.tensors]


def test_mnist1d_default_splits(mnist1d_dm: MNIST1DDataModule) -> None:
    assert (len(mnist1d_dm.train_set), len(mnist1d_dm.val_set), len(mnist1d_dm.test_set)) == (
        3500,
        500,
        1000,
    )
    x, y = mnist1d_dm.train_set.tensors
    assert x.dtype == torch.float32 and x.shape == (3500, 40)
    assert y.dtype == torch.int64
    assert mnist1d_dm.num_classes == 10 and mnist1d_dm.in_features == 40
    assert set(y.tolist()) == set(range(10))


def test_mnist1d_validation_is_last_training_samples(mnist1d_dir: Path) -> None:
    dm = MNIST1DDataModule(data_dir=str(mnist1d_dir), val_size=100)
    dm.setup("validate")
    with np.load(dm.cache_path) as cached:
        all_train = torch.from_numpy(cached["x"])
    torch.testing.assert_close(dm.val_set.tensors[0], all_train[-100:])
    torch.testing.assert_close(dm.train_set.tensors[0], all_train[:-100])


def test_mnist1d_setup_twice_keeps_datasets(mnist1d_dm: MNIST1DDataModule) -> None:
    train_set = mnist1d_dm.train_set
    mnist1d_dm.setup("test")
    assert mnist1d_dm.train_set is train_set


def test_mnist1d_cache_written_atomically_and_reused(
    mnist1d_dir: Path, mnist1d_dm: MNIST1DDataModule, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert [p.name for p in mnist1d_dir.iterdir()] == ["mnist1d_n5000_seed42.npz"]

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(mnist1d.data, "make_dataset", refuse)
    dm = MNIST1DDataModule(data_dir=str(mnist1d_dir))
    dm.prepare_data()
    dm.setup()
    for reused, original in zip(tensors(dm), tensors(mnist1d_dm), strict=True):
        torch.testing.assert_close(reused, original)


def test_mnist1d_deterministic_per_seed() -> None:
    def generate(seed: int) -> list[torch.Tensor]:
        dm = MNIST1DDataModule(num_samples=SMALL, seed=seed, val_size=20)
        dm.setup()
        return tensors(dm)

    first, again, other = generate(0), generate(0), generate(1)
    for a, b in zip(first, again, strict=True):
        torch.testing.assert_close(a, b)
    assert not torch.equal(first[0], other[0])


def test_mnist1d_generation_leaves_global_rng_untouched() -> None:
    np.random.seed(123)
    random.seed(123)
    numpy_before, python_before = np.random.get_state(), random.getstate()
    torch_before = torch.get_rng_state()
    MNIST1DDataModule(num_samples=SMALL, val_size=20).setup()
    numpy_after = np.random.get_state()
    assert numpy_after[0] == numpy_before[0]
    np.testing.assert_array_equal(numpy_after[1], numpy_before[1])
    assert numpy_after[2:] == numpy_before[2:]
    assert random.getstate() == python_before
    assert torch.equal(torch.get_rng_state(), torch_before)


def test_mnist1d_val_size_too_large(mnist1d_dir: Path) -> None:
    with pytest.raises(ValueError, match="val_size"):
        MNIST1DDataModule(data_dir=str(mnist1d_dir), val_size=4000).setup()


@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [
        ({"num_samples": 5}, "num_samples"),
        ({"val_size": -1}, "val_size"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_mnist1d_rejects_invalid_arguments(kwargs: dict, culprit: str) -> None:
    with pytest.raises(ValueError, match=culprit):
        MNIST1DDataModule(**kwargs)


def test_mnist1d_dataloaders(mnist1d_dm: MNIST1DDataModule) -> None:
    train, val, test = (
        mnist1d_dm.train_dataloader(),
        mnist1d_dm.val_dataloader(),
        mnist1d_dm.test_dataloader(),
    )
    assert isinstance(train.sampler, torch.utils.data.RandomSampler)
    assert isinstance(val.sampler, torch.utils.data.SequentialSampler)
    assert isinstance(test.sampler, torch.utils.data.SequentialSampler)
    assert not train.persistent_workers
    x, y = next(iter(train))
    assert x.shape == (100, 40) and y.shape == (100,)


def test_augmentation_only_on_training_batches(mnist1d_dir: Path) -> None:
    dm = MNIST1DDataModule(data_dir=str(mnist1d_dir), augment=True)
    x, y = torch.randn(8, 40), torch.arange(8)
    assert dm.on_after_batch_transfer((x, y), 0) == (x, y)  # no trainer attached

    dm.trainer = SimpleNamespace(training=False)
    val_x, val_y = dm.on_after_batch_transfer((x, y), 0)
    assert val_x is x and val_y is y

    dm.trainer = SimpleNamespace(training=True)
    train_x, train_y = dm.on_after_batch_transfer((x, y), 0)
    assert train_x.shape == x.shape and not torch.equal(train_x, x)
    assert train_y is y


def test_no_augmentation_when_disabled() -> None:
    dm = MNIST1DDataModule()
    dm.trainer = SimpleNamespace(training=True)
    x, y = torch.randn(8, 40), torch.arange(8)
    assert dm.on_after_batch_transfer((x, y), 0) == (x, y)


def test_augment_keeps_shape_and_changes_values() -> None:
    x = torch.randn(16, 40)
    original = x.clone()
    augmented = augment_mnist1d(x, generator=torch.Generator().manual_seed(0))
    assert augmented.shape == x.shape and augmented.dtype == x.dtype
    assert not torch.equal(augmented, x)
    assert torch.equal(x, original)  # input not modified


def test_augment_is_reproducible_with_generator() -> None:
    x = torch.randn(16, 40)
    first = augment_mnist1d(x, generator=torch.Generator().manual_seed(3))
    second = augment_mnist1d(x, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(first, second)


def test_augment_shift_clamps_edges_on_ramp() -> None:
    length = 40
    ramp = torch.arange(length, dtype=torch.float32).repeat(200, 1)
    shifted = augment_mnist1d(
        ramp, max_shift=4, scale=0.0, noise=0.0, generator=torch.Generator().manual_seed(0)
    )
    positions = torch.arange(length, dtype=torch.float32)
    shifts = positions[length // 2] - shifted[:, length // 2]
    for row, shift in zip(shifted, shifts, strict=True):
        expected = (positions - shift).clamp(0, length - 1)
        torch.testing.assert_close(row, expected)
    assert set(shifts.long().tolist()) == set(range(-4, 5))


def test_augment_scale_and_noise_ranges() -> None:
    ones = torch.ones(1000, 40)
    generator = torch.Generator().manual_seed(0)
    scaled = augment_mnist1d(ones, max_shift=0, scale=0.1, noise=0.0, generator=generator)
    factors = scaled[:, 0]
    assert torch.equal(scaled, factors[:, None].expand_as(scaled))  # one factor per sample
    assert factors.min() >= 0.9 and factors.max() <= 1.1
    noisy = augment_mnist1d(ones, max_shift=0, scale=0.0, noise=0.05, generator=generator)
    assert abs((noisy - 1).std().item() - 0.05) < 0.005


def test_augment_rejects_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="max_shift"):
        augment_mnist1d(torch.zeros(2, 40), max_shift=-1)
    with pytest.raises(ValueError, match="x must be"):
        augment_mnist1d(torch.zeros(2, 1, 40))


def synthetic_tensors(dm: SyntheticDataModule) -> list[torch.Tensor]:
    return [t for split in (dm.train_set, dm.val_set, dm.test_set) for t in split.tensors]


def test_synthetic_splits_and_attributes() -> None:
    dm = SyntheticDataModule(num_samples=400, in_features=8, num_classes=5)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (200, 100, 100)
    assert dm.num_classes == 5 and dm.in_features == 8
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    labels = torch.cat([split.tensors[1] for split in (dm.train_set, dm.val_set, dm.test_set)])
    assert torch.bincount(labels).tolist() == [80] * 5


def test_synthetic_deterministic_per_seed() -> None:
    def generate(seed: int) -> list[torch.Tensor]:
        dm = SyntheticDataModule(seed=seed)
        dm.setup()
        return synthetic_tensors(dm)

    for a, b in zip(generate(0), generate(0), strict=True):
        torch.testing.assert_close(a, b)
    assert not torch.equal(generate(0)[0], generate(1)[0])


def test_synthetic_dict_batches() -> None:
    dm = SyntheticDataModule(num_samples=100, batch_size=10, as_dict=True)
    dm.setup()
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        batch = next(iter(loader))
        assert set(batch) == {"input", "target"}
        assert batch["input"].shape == (10, 16) and batch["target"].shape == (10,)
    tuples = SyntheticDataModule(num_samples=100, batch_size=10)
    tuples.setup()
    x, y = next(iter(tuples.val_dataloader()))
    batch = next(iter(dm.val_dataloader()))
    torch.testing.assert_close(batch["input"], x)
    torch.testing.assert_close(batch["target"], y)


@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "test_fraction"),
        ({"num_classes": 0}, "num_classes"),
        ({"noise": -1.0}, "noise"),
    ],
)
def test_synthetic_rejects_invalid_arguments(kwargs: dict, culprit: str) -> None:
    with pytest.raises(ValueError, match=culprit):
        SyntheticDataModule(**kwargs)


def test_mnist1d_failed_cache_write_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        MNIST1DDataModule(data_dir=str(tmp_path), num_samples=SMALL, val_size=20).setup()
    assert list(tmp_path.iterdir()) == []
