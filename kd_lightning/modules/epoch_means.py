"""A LightningModule base that logs per-stage epoch means without one ``self.log`` per step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from lightning.pytorch import LightningModule
from torch import Tensor

from kd_lightning.metrics.running_means import RunningMeans

Stage = Literal["train", "val", "test"]


class EpochMeans(LightningModule):
    """Log ``{stage}/{name}`` as epoch means of scalars that each step adds on the device.

    Steps call :meth:`update_epoch_means`; the ``on_*_epoch_end`` hooks divide once, after summing
    weighted sums and weights over DDP processes, so means are exact under DDP (counts summed,
    not per-process ratios averaged). One ``self.log`` per value and step would cost about a
    millisecond of Python on a CPU, as much as a small model's step. A ``"loss"`` name keeps the
    keys Lightning gives a loss logged on step and epoch: ``train/loss_step`` (only on steps whose
    value a progress bar or logger reads), ``train/loss_epoch``, and ``train/loss`` (for callbacks
    such as checkpointing, not sent to loggers). ``loss`` and ``acc`` go to the progress bar.

    A training step's values join the means when the next step adds its own or the epoch ends,
    so that until then :meth:`train_step_values` shows them and :meth:`discard_train_step` can
    leave them out (:class:`~kd_lightning.callbacks.NonFiniteLossGuard` does for skipped steps).

    Subclasses overriding an epoch hook must call ``super()``'s.

    Args:
        names: the scalars each step adds, in the order :meth:`update_epoch_means` takes them.

    Examples:
        >>> import torch
        >>> module = EpochMeans(["loss", "acc"])
        >>> module.update_epoch_means("val", [torch.tensor(2.0), torch.tensor(1.0)], [3, 3])
        >>> module.update_epoch_means("val", [torch.tensor(4.0), torch.tensor(0.0)], [1, 1])
        >>> {name: round(value.item(), 3) for name, value in module.epoch_means("val").items()}
        {'loss': 2.5, 'acc': 0.75}
    """

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__()
        self._epoch_means = {stage: RunningMeans(names) for stage in ("train", "val", "test")}
        self._train_step: tuple[Sequence[Tensor], Sequence[Tensor | float]] | None = None

    def update_epoch_means(
        self, stage: Stage, values: Sequence[Tensor], weights: Sequence[Tensor | float]
    ) -> None:
        """Add one step's ``values`` with ``weights`` (e.g. the batch size) to the stage's means.

        On training steps whose loss is read, also logs ``train/loss_step``.
        """
        means = self._epoch_means[stage]
        if stage == "train":
            self._add_train_step()
            self._train_step = (values, weights)
        else:
            means.update(values, weights)
        if stage == "train" and "loss" in means.names and self._step_loss_is_read():
            loss = values[means.names.index("loss")]
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True)

    def epoch_means(self, stage: Stage) -> dict[str, Tensor]:
        """The stage's means so far, over all processes (every process must call it)."""
        if stage == "train":
            self._add_train_step()
        return self._epoch_means[stage].compute(reduce=self._sum_over_processes, device=self.device)

    def train_step_values(self) -> dict[str, Tensor]:
        """The values the latest training step passed to :meth:`update_epoch_means`, by name;
        empty once they joined the means (at the next step or the epoch's end).

        Examples:
            >>> import torch
            >>> module = EpochMeans(["loss", "kd"])
            >>> module.update_epoch_means("train", [torch.tensor(1.0), torch.tensor(0.5)], [2, 2])
            >>> module.train_step_values()
            {'loss': tensor(1.), 'kd': tensor(0.5000)}
        """
        if self._train_step is None:
            return {}
        return dict(zip(self._epoch_means["train"].names, self._train_step[0], strict=True))

    def discard_train_step(self) -> None:
        """Leave the latest training step's values out of the epoch means.

        Examples:
            >>> import torch
            >>> module = EpochMeans(["loss"])
            >>> module.update_epoch_means("train", [torch.tensor(1.0)], [1])
            >>> module.update_epoch_means("train", [torch.tensor(float("nan"))], [1])
            >>> module.discard_train_step()
            >>> module.epoch_means("train")
            {'loss': tensor(1.)}
        """
        self._train_step = None

    def _add_train_step(self) -> None:
        if self._train_step is not None:
            self._epoch_means["train"].update(*self._train_step)
            self._train_step = None

    def on_train_epoch_start(self) -> None:
        self._epoch_means["train"].reset()
        self._train_step = None

    def on_validation_epoch_start(self) -> None:
        self._epoch_means["val"].reset()

    def on_test_epoch_start(self) -> None:
        self._epoch_means["test"].reset()

    def on_train_epoch_end(self) -> None:
        self._log_epoch_means("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_means("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_means("test")

    def _log_epoch_means(self, stage: Stage) -> None:
        """Log the stage's epoch means and forget them."""
        values = self.epoch_means(stage)
        self._epoch_means[stage].reset()
        for name, value in values.items():
            # Identical on every process already; sync_dist only tells Lightning so.
            bar = name in ("loss", "acc")
            if stage == "train" and name == "loss":
                self.log("train/loss_epoch", value, prog_bar=True, sync_dist=True)
                self.log("train/loss", value, logger=False, sync_dist=True)
            else:
                self.log(f"{stage}/{name}", value, prog_bar=bar, sync_dist=True)

    def _step_loss_is_read(self) -> bool:
        """Whether this step's ``train/loss_step`` reaches anyone: a progress bar shows it, or
        the loggers record this step (every ``log_every_n_steps``)."""
        trainer = self._trainer
        if trainer is None:  # a step called by hand: nothing is logged
            return False
        if trainer.progress_bar_callback is not None:
            return True
        if not trainer.loggers:
            return False
        return bool(getattr(trainer._logger_connector, "should_update_logs", True))

    def _sum_over_processes(self, tensor: Tensor) -> Tensor:
        if self._trainer is None or self.trainer.world_size == 1:
            return tensor
        return self.trainer.strategy.reduce(tensor, reduce_op="sum")
