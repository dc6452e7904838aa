"""Plain cross-entropy training: teachers before distillation, and the from-scratch baseline."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.modules.base import MethodModule
from kd_lightning.modules.epoch_means import Stage
from kd_lightning.modules.optim import OptimizerFactory, SchedulerFactory


class ClassifierModule(MethodModule):
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
        super().__init__(("loss", "acc"), optimizer, scheduler, scheduler_interval, batch_adapter)
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler", "batch_adapter"])
        self.model = model

    @property
    def student(self) -> nn.Module:
        """The network trained: ``model``."""
        return self.model

    def step(self, batch: Any, stage: Stage) -> Tensor:
        inputs, labels = self.batch_adapter(batch)
        logits = self.model(inputs)
        loss = F.cross_entropy(logits.float(), labels)
        accuracy = (logits.argmax(-1) == labels).float().mean()
        size = float(labels.shape[0])
        self.update_epoch_means(stage, [loss, accuracy], [size, size])
        return loss
