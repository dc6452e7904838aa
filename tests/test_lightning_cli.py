"""DistillationModule trains from a YAML file through Lightning's own LightningCLI (jsonargparse)."""

from __future__ import annotations

import sys

import lightning as L
import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.cli import LightningCLI

from kd_lightning import DistillationLoss, DistillationModule, TeacherEnsemble
from kd_lightning.fusion import EntropyWeighted
from kd_lightning.models import CNN1D, MLP

# lightning 2.6's LightningCLI still calls jsonargparse APIs deprecated in jsonargparse 4.49
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:lightning.pytorch.cli")

TEACHERS_AS_ENSEMBLE = """
  teachers:
    class_path: kd_lightning.teachers.TeacherEnsemble
    init_args:
      teachers:
        cnn:
          class_path: kd_lightning.models.CNN1D
          init_args: {channels: 4}
        mlp:
          class_path: kd_lightning.models.MLP
          init_args: {hidden: 16}
"""
# DistillationModule also takes a plain ``name -> model`` mapping and wraps it itself
TEACHERS_AS_MAPPING = """
  teachers:
    cnn:
      class_path: kd_lightning.models.CNN1D
      init_args: {channels: 4}
    mlp:
      class_path: kd_lightning.models.MLP
      init_args: {hidden: 16}
"""

CONFIG = """
seed_everything: 0
model:
  student:
    class_path: kd_lightning.models.MLP
    init_args: {{in_features: 40, num_classes: 10, hidden: 32}}
{teachers}
  loss:
    class_path: kd_lightning.DistillationLoss
    init_args: {{fusion: entropy, alpha: 0.5, temperature: 2.0}}
  optimizer:
    class_path: torch.optim.Adam
    init_args: {{lr: 0.01}}
data:
  class_path: kd_lightning.data.SyntheticDataModule
  init_args: {{in_features: 40, num_classes: 10, num_samples: 256, batch_size: 32}}
trainer:
  accelerator: cpu
  devices: 1
  max_epochs: 1
  limit_train_batches: 3
  limit_val_batches: 2
  num_sanity_val_steps: 0
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {root}
"""


class SnapshotAtFitStart(Callback):
    """Copy the student's and the teachers' weights when fitting starts."""

    def __init__(self) -> None:
        self.student: dict[str, torch.Tensor] = {}
        self.teachers: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert isinstance(pl_module, DistillationModule)
        self.student = {k: v.detach().clone() for k, v in pl_module.student.state_dict().items()}
        self.teachers = {k: v.detach().clone() for k, v in pl_module.teachers.state_dict().items()}


@pytest.mark.parametrize(
    "teachers", [TEACHERS_AS_ENSEMBLE, TEACHERS_AS_MAPPING], ids=["ensemble", "mapping"]
)
def test_lightning_cli_fits_distillation_module_from_yaml(tmp_path, monkeypatch, teachers):
    monkeypatch.setattr(sys, "argv", ["cli"])  # only `args` below, not pytest's own arguments
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(teachers=teachers.rstrip("\n"), root=tmp_path))
    snapshot = SnapshotAtFitStart()

    cli = LightningCLI(
        DistillationModule,
        L.LightningDataModule,
        subclass_mode_data=True,
        args=["fit", "--config", str(config)],
        trainer_defaults={"callbacks": [snapshot]},
        save_config_callback=None,
    )

    assert cli.trainer.state.finished
    assert cli.trainer.global_step == 3
    module = cli.model
    assert isinstance(module, DistillationModule)
    assert isinstance(module.student, MLP)
    assert isinstance(module.teachers, TeacherEnsemble)
    assert module.teachers.names == ["cnn", "mlp"]
    assert isinstance(module.teachers.teachers["cnn"], CNN1D)
    assert isinstance(module.loss, DistillationLoss)
    assert isinstance(module.loss.fusion, EntropyWeighted)
    assert (module.loss.alpha, module.loss.temperature) == (0.5, 2.0)
    optimizer = cli.trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.param_groups[0]["lr"] == 0.01

    student = module.student.state_dict()
    assert any(not torch.equal(student[key], value) for key, value in snapshot.student.items()), (
        "the student's parameters did not change during fit"
    )
    teachers_after = module.teachers.state_dict()
    assert all(torch.equal(teachers_after[key], value) for key, value in snapshot.teachers.items())
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss_epoch"])
    assert 0.0 <= float(cli.trainer.callback_metrics["val/acc"]) <= 1.0
