"""ProKT, Tf-KD and online methods log exact epoch means under the keys they always had."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning.functional import dml_losses, prokt_student_loss
from kd_lightning.modules import AFDModule, DMLModule, ProKTModule, VirtualTeacherModule


def uneven_split() -> tuple[DataLoader, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    inputs, labels = torch.randn(45, 4), torch.randint(0, 3, (45,))
    return DataLoader(TensorDataset(inputs, labels), batch_size=32), inputs, labels


def trainer(tmp_path=None, **options) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=CSVLogger(tmp_path) if tmp_path is not None else False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **options,
    )


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of correct predictions, in float64 (logged means are float32)."""
    return float((logits.numpy().argmax(1) == labels.numpy()).mean())


def test_online_validation_means_equal_the_whole_split():
    loader, inputs, labels = uneven_split()  # batches of 32 and 13
    module = DMLModule(nn.Linear(4, 3), nn.Linear(4, 3))
    metrics = trainer().validate(module, dataloaders=loader, verbose=False)[0]

    with torch.no_grad():
        logits = [peer(inputs) for peer in module.peers.values()]
        loss = dml_losses(torch.stack(logits), labels).sum().item()  # per-example means
    assert abs(metrics["val/loss"] - loss) < 1e-6
    assert abs(metrics["val/acc"] - accuracy(logits[0], labels)) < 1e-7
    assert abs(metrics["val/peer_acc/peer0"] - accuracy(logits[0], labels)) < 1e-7
    assert abs(metrics["val/peer_acc/peer1"] - accuracy(logits[1], labels)) < 1e-7


def test_prokt_and_virtual_teacher_validation_means_equal_the_whole_split():
    loader, inputs, labels = uneven_split()
    prokt = ProKTModule(nn.Linear(4, 3), nn.Linear(4, 3), temperature=2.0)
    metrics = trainer().validate(prokt, dataloaders=loader, verbose=False)[0]
    with torch.no_grad():
        student = prokt.student(inputs)
        loss = prokt_student_loss(student, prokt.teacher(inputs), 2.0).item()
    assert abs(metrics["val/loss"] - loss) < 1e-6
    assert abs(metrics["val/acc"] - accuracy(student, labels)) < 1e-7
    assert "val/teacher_loss" not in metrics  # the teacher trains only in training steps

    virtual = VirtualTeacherModule(nn.Linear(4, 3), num_classes=3)
    metrics = trainer().validate(virtual, dataloaders=loader, verbose=False)[0]
    with torch.no_grad():
        student = virtual.student(inputs)
    assert abs(metrics["val/ce"] - F.cross_entropy(student, labels).item()) < 1e-6
    assert abs(metrics["val/acc"] - accuracy(student, labels)) < 1e-7


def test_manual_optimisation_logs_step_losses_and_train_only_means(tmp_path):
    loader, _, _ = uneven_split()
    nets = [nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)) for _ in range(2)]
    modules = {
        "prokt": ProKTModule(nn.Linear(4, 3), nn.Linear(4, 3)),
        "dml": DMLModule(nn.Linear(4, 3), nn.Linear(4, 3), update="sequential"),
        "afd": AFDModule(*nets, feature_layers="1"),
    }
    modules["afd"].materialize(next(iter(loader)))
    extra = {
        "prokt": {"train/teacher_loss"},
        "dml": {"train/peer_acc/peer0", "train/peer_acc/peer1"},
        "afd": {"train/adversarial/discriminator", "train/adversarial/generator"},
    }
    for name, module in modules.items():
        assert not module.automatic_optimization
        fit = trainer(tmp_path / name, max_epochs=1, log_every_n_steps=1, limit_val_batches=0)
        fit.fit(module, train_dataloaders=loader)
        logged = set(fit.logged_metrics)
        assert {"train/loss_step", "train/loss_epoch", "train/acc"} | extra[name] <= logged, name
        rows = (tmp_path / name).rglob("metrics.csv")
        header = next(iter(rows)).read_text().splitlines()[0].split(",")
        assert "train/loss_step" in header and "train/loss" not in header, name
        losses = fit.callback_metrics["train/loss"]
        assert np.isfinite(losses.item()) and losses == fit.callback_metrics["train/loss_epoch"]
