"""Teacher-free distillation with Tf-KD's virtual teacher: a hand-made label distribution."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.batch import BatchAdapter
from kd_lightning.functional import tfkd_virtual_loss, virtual_teacher_logits
from kd_lightning.modules.epoch_means import EpochMeans, Stage
from kd_lightning.modules.optim import OptimizerFactory, SchedulerFactory, configure_optimizers

VIRTUAL_TEACHER = "virtual"


class VirtualTeacherModule(EpochMeans):
    """Tf-KD with the virtual teacher (Yuan et al., "Revisiting Knowledge Distillation via Label
    Smoothing Regularization", CVPR 2020, "Tf-KD_reg").

    No network teaches: the target is ``p_d(k) = a`` for the true class and ``(1 − a)/(C − 1)``
    otherwise, softened as ``softmax(log p_d / T)``, and the student minimises the paper's
    ``(1 − α)·CE(y, q) + α·T²·KL(p_d^τ ‖ q^τ)`` (:func:`~kd_lightning.functional.tfkd_virtual_loss`).
    This follows the paper rather than its code, which softens by a softmax over probabilities,
    drops T², averages the KL over classes and multiplies the term by 50 to 100.

    For the agreement callback and the summary, the virtual teacher is reported as one teacher
    named ``"virtual"`` whose logits are ``log p_d`` (log-probabilities): it always predicts the
    label, so its accuracy is 1 and the student's agreement with it is the student's accuracy.
    Logged as epoch means: ``{stage}/loss``, ``{stage}/ce`` (the hard-label cross-entropy) and
    ``{stage}/acc``.

    Args:
        student: the network being trained.
        num_classes: C.
        correct_prob: a, the virtual teacher's probability of the true class.
        alpha: weight of the KD term.
        temperature: T; the KL term carries T².
        optimizer, scheduler, scheduler_interval, batch_adapter: as for
            :class:`~kd_lightning.DistillationModule`.

    Example:
        >>> module = VirtualTeacherModule(nn.Linear(4, 3), num_classes=3)
        >>> module.teacher_names, module(torch.randn(2, 4)).shape
        (['virtual'], torch.Size([2, 3]))
    """

    def __init__(
        self,
        student: nn.Module,
        num_classes: int,
        correct_prob: float = 0.99,
        alpha: float = 0.5,
        temperature: float = 4.0,
        optimizer: OptimizerFactory = torch.optim.Adam,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
        batch_adapter: Callable[[Any], tuple[Any, Tensor]] | None = None,
    ) -> None:
        super().__init__(("loss", "ce", "acc"))
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        virtual_teacher_logits(torch.zeros(1, dtype=torch.long), num_classes, correct_prob)
        self.save_hyperparameters(ignore=["student", "optimizer", "scheduler", "batch_adapter"])
        self.student = student
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.batch_adapter = batch_adapter if batch_adapter is not None else BatchAdapter()

    @property
    def teacher_names(self) -> list[str]:
        """``["virtual"]``."""
        return [VIRTUAL_TEACHER]

    def forward(self, inputs: Any) -> Tensor:
        """The student's logits."""
        return self.student(inputs)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self._step(batch, "test")

    def configure_optimizers(self) -> Any:
        return configure_optimizers(
            self.student.parameters(),
            self.optimizer_factory,
            self.scheduler_factory,
            total_steps=int(self.trainer.estimated_stepping_batches),
            interval=self.hparams["scheduler_interval"],
        )

    def _step(self, batch: Any, stage: Stage) -> dict[str, Tensor]:
        inputs, labels = self.batch_adapter(batch)
        student_logits = self.student(inputs)
        num_classes, correct_prob = self.hparams["num_classes"], self.hparams["correct_prob"]
        if student_logits.shape[-1] != num_classes:
            raise ValueError(
                f"the student outputs {student_logits.shape[-1]} classes but num_classes={num_classes}"
            )
        loss = tfkd_virtual_loss(
            student_logits,
            labels,
            self.hparams["alpha"],
            self.hparams["temperature"],
            correct_prob,
        )
        size = float(labels.shape[0])
        self.update_epoch_means(
            stage,
            [
                loss,
                F.cross_entropy(student_logits.detach().float(), labels),
                (student_logits.argmax(-1) == labels).float().mean(),
            ],
            [size, size, size],
        )
        teacher_logits = virtual_teacher_logits(labels, num_classes, correct_prob)
        return {
            "loss": loss,
            "student_logits": student_logits.detach(),
            "teacher_logits": teacher_logits.unsqueeze(0),
            "labels": labels,
        }
