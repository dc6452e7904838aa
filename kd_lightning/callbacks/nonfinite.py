"""Stop, or skip the update, when a training step's loss is NaN or infinite."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from kd_lightning.callbacks.progress import progress_bar
from kd_lightning.errors import NonFiniteLossError, TeacherOutputError
from kd_lightning.modules.epoch_means import EpochMeans
from kd_lightning.teachers.cache.topk import TopKLogits
from kd_lightning.teachers.runtime import check_finite_logits

OnNonFinite = Literal["stop", "skip"]
ON_NONFINITE = ("stop", "skip")


class NonFiniteLossGuard(Callback):
    """Check every loss a training step back-propagates; on NaN or inf, stop or skip the step.

    Each loss reaching ``backward`` (the loss ``training_step`` returns, or each
    ``manual_backward`` of a method that optimises by hand) adds a device-side ``isfinite``; the
    result is read once, just before the optimizer step (one host-device sync per optimizer
    step, after the backward pass is queued; under DDP one scalar all-reduce more, so that every
    rank decides alike). A step found non-finite gets no update: its gradients are dropped before
    every optimizer step left in the batch (under gradient accumulation, before the next one).

    * ``on_nonfinite="stop"`` (default) then raises
      :class:`~kd_lightning.errors.NonFiniteLossError` at the end of the batch, before any
      checkpoint callback runs, naming the step (global step, epoch, batch index), the terms the
      module adds to its epoch means that are not finite (``ce``, ``kd``, ``hint``,
      ``adversarial/discriminator``, ...; see
      :class:`~kd_lightning.modules.epoch_means.EpochMeans`), and the student or the teacher
      whose logits were not (the step outputs' ``student_logits`` and
      ``teacher_logits``, read with :func:`~kd_lightning.teachers.runtime.check_finite_logits`,
      or the values and tail of ``teacher_topk``).
      The weights stay as they were before the step and ``last.ckpt`` keeps the last good state.
    * ``on_nonfinite="skip"`` goes on with the next batch, leaves the step out of the epoch
      means and counts it: :attr:`skipped_steps` (kept in checkpoints), logged as
      ``train/skipped_steps`` at each epoch's end.

    Under manual optimisation the updates a step made before its first non-finite loss (e.g.
    DML's earlier peers) stay. Buffers that a forward pass updates (batch-norm statistics) are
    not rolled back. A training that skipped steps warns with their count when it ends.

    Args:
        on_nonfinite: ``"stop"`` or ``"skip"``.
        label: what is trained (``"teacher cnn"``, ``"stage takd-assistant1"``), put before the
            error and the warning; ``None`` for the run's own model.

    Examples:
        >>> import lightning as L
        >>> from kd_lightning.modules import ClassifierModule
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> inputs = torch.randn(12, 3)
        >>> inputs[4:8] = float("nan")  # the second of three batches
        >>> data = DataLoader(TensorDataset(inputs, torch.randint(0, 2, (12,))), batch_size=4)
        >>> guard = NonFiniteLossGuard("skip")
        >>> trainer = L.Trainer(max_epochs=1, callbacks=[guard], logger=False,
        ...                     enable_checkpointing=False, enable_progress_bar=False,
        ...                     enable_model_summary=False)
        >>> trainer.fit(ClassifierModule(torch.nn.Linear(3, 2)), train_dataloaders=data)
        >>> guard.skipped_steps, trainer.callback_metrics["train/skipped_steps"].item()
        (1, 1.0)
    """

    def __init__(self, on_nonfinite: OnNonFinite = "stop", label: str | None = None) -> None:
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(
                f"on_nonfinite must be one of {list(ON_NONFINITE)}, got {on_nonfinite!r}"
            )
        self.on_nonfinite = on_nonfinite
        self.label = label
        self.skipped_steps = 0
        self._finite: Tensor | None = None  # every loss back-propagated since the last read
        self._bad_batch = False  # this batch had a non-finite loss
        self._dropping = False  # drop gradients until an optimizer step has been skipped
        self._stepped = False  # an optimizer step came since this batch started
        self._where = (0, 0, 0)  # global step, epoch, batch index

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict["skipped_steps"])

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._where = (trainer.global_step, trainer.current_epoch, batch_idx)
        self._bad_batch = False
        self._stepped = False

    def on_before_backward(
        self, trainer: Trainer, pl_module: LightningModule, loss: Tensor
    ) -> None:
        finite = torch.isfinite(loss.detach())
        if finite.ndim:
            finite = finite.all()
        self._finite = finite if self._finite is None else self._finite & finite

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Any
    ) -> None:
        self._read(trainer)
        self._stepped = True
        if self._dropping:
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    parameter.grad = None

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._read(trainer)  # losses back-propagated with no optimizer step after them
        if self._stepped:
            self._dropping = False
        if not self._bad_batch:
            return
        if self.on_nonfinite == "stop":
            raise NonFiniteLossError(self._describe(pl_module, outputs))
        self.skipped_steps += 1
        if isinstance(pl_module, EpochMeans):
            pl_module.discard_train_step()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.on_nonfinite == "skip":
            # The same count on every process already; sync_dist only tells Lightning so.
            pl_module.log("train/skipped_steps", float(self.skipped_steps), sync_dist=True)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.skipped_steps:
            rank_zero_warn(
                f"{self._prefix()}{self.skipped_steps} training steps had a NaN or inf loss and "
                "were skipped (on_nonfinite=skip)"
            )

    def _prefix(self) -> str:
        return "" if self.label is None else f"{self.label}: "

    def _read(self, trainer: Trainer) -> None:
        """Read whether the losses since the last read were finite (on any process)."""
        if self._finite is None:
            return
        bad = not bool(self._finite)
        self._finite = None
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            self._bad_batch = self._dropping = True

    def _describe(self, pl_module: LightningModule, outputs: Any) -> str:
        step, epoch, batch_idx = self._where
        terms = {}
        if isinstance(pl_module, EpochMeans):
            terms = {
                name: float(value.detach())
                for name, value in pl_module.train_step_values().items()
                if not math.isfinite(float(value.detach()))
            }
        if terms:
            named = sorted(terms, key=lambda name: name == "loss")  # the total last
            found = ", ".join(f"{name} = {terms[name]}" for name in named)
        else:
            found = "no term this process logged is NaN or inf (another process's loss was)"
        culprits = _culprits(pl_module, outputs)
        return (
            f"{self._prefix()}non-finite loss at global step {step} (epoch {epoch}, batch {batch_idx}): {found}"
            f"{'; ' if culprits else ''}{'; '.join(culprits)}. Training stopped without "
            "applying the non-finite loss, so the last checkpoint holds the state before this "
            "step; on_nonfinite=skip skips such steps instead"
        )


def _culprits(pl_module: LightningModule, outputs: Any) -> list[str]:
    """Which networks' logits in the step ``outputs`` are not finite: the student, and the
    first teacher whose ``teacher_logits`` row, or ``teacher_topk`` values and tail, are not
    (``teacher_indices`` into the module's ``teacher_names``, or every teacher in order). A tail
    of ``-inf`` (no mass outside the top k) is no fault."""
    if not isinstance(outputs, dict):
        return []
    found = []
    student = outputs.get("student_logits")
    if isinstance(student, Tensor) and not bool(torch.isfinite(student).all()):
        found.append("the student produced NaN or inf logits")
    logits = outputs.get("teacher_logits")
    topk = outputs.get("teacher_topk")
    if isinstance(topk, TopKLogits):  # each teacher's row: its top-k values, then its tail
        tail = topk.tail_logsumexp.masked_fill(topk.tail_logsumexp == -math.inf, 0.0)
        logits = torch.cat([topk.values.flatten(1), tail.flatten(1)], dim=1)
    names = list(getattr(pl_module, "teacher_names", []))
    if isinstance(logits, Tensor) and names:
        indices = outputs.get("teacher_indices")
        ran = range(len(names)) if indices is None else [int(index) for index in indices]
        try:
            check_finite_logits([names[index] for index in ran], logits)
        except TeacherOutputError as error:
            found.append(str(error))
    return found


def training_callbacks(
    label: str, on_nonfinite: OnNonFinite = "stop", show_progress: bool = True
) -> list[Callback]:
    """The callbacks of a training besides the run's own (a teacher, an earlier stage, the
    scratch baseline): a :class:`NonFiniteLossGuard` naming ``label`` and, when
    ``show_progress``, a progress bar labelled ``label``.

    Examples:
        >>> [type(callback).__name__ for callback in training_callbacks("teacher cnn", "skip")]
        ['NonFiniteLossGuard', 'LabelledProgressBar']
        >>> training_callbacks("teacher cnn", show_progress=False)[0].label
        'teacher cnn'
    """
    return [NonFiniteLossGuard(on_nonfinite, label), *progress_bar(label, show_progress)]
