"""Plain cross-entropy training: teachers before distillation, and the from-scratch baseline."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.batch import BatchAdapter
from kd_lightning.modules.epoch_means import EpochMeans, Stage
from kd_lightning.modules.optim import OptimizerFactory, SchedulerFactory, configure_optimizers


class ClassifierModule(EpochMeans):
    """Train ``model`` on labels alone; logs ``{stage}/loss`` and ``{stage}/acc``.

    Both are epoch means weighted by batch size and summed over processes before dividing, as
    :class:`~kd_lightning.DistillationModule` logs them (see
    :class:`~kd_lightning.modules.epoch_means.EpochMeans`), so the two train at the same
    logging cost.

    Args:
        model: the network.
        optimizer: called with the model's parameters.
        scheduler: called with the optimizer (and ``total_steps`` when it takes it), or ``None``.
        scheduler_interval: ``"step"`` or ``"epoch"``.
        batch_adapter: turns a batch into ``(inputs, labels)``.

    Example:
        >>> module = ClassifierModule(nn.Linear(4, 3))
        >>> module(torch.randn(2, 4)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory = torch.optim.Adam,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
        batch_adapter: Callable[[Any], tuple[Any, Tensor]] | None = None,
    ) -> None:
        super().__init__(("loss", "acc"))
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler", "batch_adapter"])
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.batch_adapter = batch_adapter if batch_adapter is not None else BatchAdapter()

    def forward(self, inputs: Any) -> Tensor:
        return self.model(inputs)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def configure_optimizers(self) -> Any:
        return configure_optimizers(
            self.model.parameters(),
            self.optimizer_factory,
            self.scheduler_factory,
            total_steps=int(self.trainer.estimated_stepping_batches),
            interval=self.hparams["scheduler_interval"],
        )

    def _step(self, batch: Any, stage: Stage) -> Tensor:
        inputs, labels = self.batch_adapter(batch)
        logits = self.model(inputs)
        loss = F.cross_entropy(logits.float(), labels)
        accuracy = (logits.argmax(-1) == labels).float().mean()
        size = float(labels.shape[0])
        self.update_epoch_means(stage, [loss, accuracy], [size, size])
        return loss
