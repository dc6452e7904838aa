"""Shared fixtures: tiny students and teachers on synthetic data, quiet Lightning trainers."""

from __future__ import annotations

import os
import warnings

import lightning as L
import pytest
import torch
from torch import nn

os.environ.setdefault("WANDB_MODE", "disabled")
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")

NUM_FEATURES = 8
NUM_CLASSES = 4


def small_mlp(num_classes: int = NUM_CLASSES, hidden: int = 16) -> nn.Module:
    return nn.Sequential(nn.Linear(NUM_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def make_trainer(tmp_path, **overrides) -> L.Trainer:
    options = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    options.update(overrides)
    return L.Trainer(**options)


@pytest.fixture(autouse=True)
def _seed() -> None:
    L.seed_everything(0, workers=True, verbose=False)
    torch.set_num_threads(2)


@pytest.fixture
def teachers() -> dict[str, nn.Module]:
    return {
        "a": small_mlp(),
        "b": small_mlp(hidden=8),
        "c": nn.Sequential(nn.Linear(NUM_FEATURES, NUM_CLASSES)),
    }


@pytest.fixture
def datamodule():
    from kd_lightning.data import SyntheticDataModule

    return SyntheticDataModule(
        num_samples=256, in_features=NUM_FEATURES, num_classes=NUM_CLASSES, batch_size=32
    )
