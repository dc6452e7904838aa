"""Plain cross-entropy training: teachers before distillation, and the from-scratch baseline."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.batch import IGNORE_INDEX
from kd_lightning.modules.base import MethodModule
from kd_lightning.modules.epoch_means import Stage
from kd_lightning.modules.optim import OptimizerFactory, SchedulerFactory


class ClassifierModule(MethodModule):
    """Train ``model`` on labels alone; logs ``{stage}/loss`` and ``{stage}/acc``.

    Logits ``(*batch, C)`` pair with labels ``(*batch)``: one class per sample, or, for a
    language model, next-token logits ``(B, L, V)`` with labels ``(B, L)`` (as
    :class:`~kd_lightning.data.TextDataModule` gives them). Labels equal to ``-100`` (padding,
    masked prompts, classes a teacher does not cover) count nowhere: the loss is the
    cross-entropy averaged over the other positions, and the accuracy counts them only.

    Both are epoch means summed over processes before dividing, the loss weighted by batch size
    and the accuracy by the number of labelled positions, as
    :class:`~kd_lightning.DistillationModule` logs them (see
    :class:`~kd_lightning.modules.epoch_means.EpochMeans`), so the two train at the same
    logging cost and their numbers compare.

    Args:
        model: the network.
        optimizer: called with the model's parameters.
        scheduler: called with the optimizer (and ``total_steps`` when it takes it), or ``None``.
        scheduler_interval: ``"step"`` or ``"epoch"``.
        batch_adapter: turns a batch into ``(inputs, labels)``.

    Examples:
        >>> module = ClassifierModule(nn.Linear(4, 3))
        >>> module(torch.randn(2, 4)).shape
        torch.Size([2, 3])

        A language model on a dict batch, the last position unlabelled:

        >>> from kd_lightning.models import CausalLM
        >>> lm = ClassifierModule(CausalLM(vocab_size=9, d_model=8, n_layers=1, n_heads=2, max_len=4))
        >>> tokens = torch.tensor([[1, 2, 3, 4]])
        >>> batch = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens),
        ...          "labels": torch.tensor([[2, 3, 4, -100]])}
        >>> lm.validation_step(batch, 0).ndim
        0
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
        if logits.shape[:-1] != labels.shape:
            raise ValueError(
                f"{type(self.model).__name__} gives logits of shape {tuple(logits.shape)} for "
                f"labels of shape {tuple(labels.shape)}: expected logits (*batch, classes) for "
                f"labels (*batch)"
            )
        real = labels != IGNORE_INDEX
        labelled = real.sum()
        summed = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        loss = summed / labelled.clamp_min(1)
        accuracy = ((logits.argmax(-1) == labels) & real).sum() / labelled.clamp_min(1)
        self.update_epoch_means(stage, [loss, accuracy], [float(labels.shape[0]), labelled])
        return loss
