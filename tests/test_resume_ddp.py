"""A 2-rank DDP run stopped after an epoch and resumed ends where an uninterrupted run ends,
with ranks whose random streams differ."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning.callbacks import RandomStateCheckpoint

pytestmark = pytest.mark.slow


class DropoutNet(L.LightningModule):
    """A network with dropout whose ranks draw different amounts of random numbers per step,
    as data-dependent augmentation would; only exact per-rank random states resume it exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3))

    def training_step(self, batch, batch_idx):
        torch.rand(1 + 2 * self.global_rank)  # rank-dependent draws: the streams diverge
        inputs, labels = batch
        return nn.functional.cross_entropy(self.net(inputs), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(64, 8, generator=generator), torch.randint(0, 3, (64,), generator=generator)
    )
    return DataLoader(data, batch_size=8, shuffle=True)


def fit(root, max_epochs: int, ckpt_path: str | None = None) -> str:
    L.seed_everything(0, verbose=False)
    checkpoints = ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0)
    trainer = L.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        strategy="ddp_spawn",
        devices=2,
        max_epochs=max_epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[checkpoints, RandomStateCheckpoint()],
    )
    trainer.fit(DropoutNet(), train_dataloaders=loader(), ckpt_path=ckpt_path)
    return str(root / "last.ckpt")


def test_every_rank_resumes_its_own_random_state(tmp_path):
    uninterrupted = torch.load(fit(tmp_path / "full", 2), weights_only=True)
    first = fit(tmp_path / "split", 1)
    saved = torch.load(first, weights_only=True)["callbacks"]["RandomStateCheckpoint"]["ranks"]
    assert len(saved) == 2 and not torch.equal(saved[0]["torch"], saved[1]["torch"])
    resumed = torch.load(fit(tmp_path / "split", 2, ckpt_path=first), weights_only=True)
    for key, value in uninterrupted["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=0, msg=key)
