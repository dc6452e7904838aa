"""Epoch means logged by the modules weigh batches by their size, like a plain loop over the data."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning.modules import ClassifierModule


def test_classifier_validation_means_equal_the_whole_split():
    torch.manual_seed(0)
    inputs, labels = torch.randn(45, 4), torch.randint(0, 3, (45,))
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=32)  # batches of 32 and 13
    model = torch.nn.Linear(4, 3)
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    metrics = trainer.validate(ClassifierModule(model), dataloaders=loader, verbose=False)[0]

    with torch.no_grad():
        logits = model(inputs).double().numpy()
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    expected_loss = -log_probs[np.arange(45), labels.numpy()].mean()
    expected_acc = (logits.argmax(1) == labels.numpy()).mean()
    assert abs(metrics["val/loss"] - expected_loss) < 1e-6
    assert abs(metrics["val/acc"] - expected_acc) < 1e-7
