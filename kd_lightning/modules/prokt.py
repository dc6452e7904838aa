"""ProKT: a teacher trained alongside the student and held near it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from kd_lightning.batch import BatchAdapter
from kd_lightning.functional import prokt_student_loss, prokt_teacher_loss
from kd_lightning.modules.epoch_means import EpochMeans, Stage
from kd_lightning.modules.optim import OptimizerFactory, SchedulerFactory, configure_optimizers


class ProKTModule(EpochMeans):
    """ProKT (Shi et al., "Follow Your Path: a Progressive Method for Knowledge Distillation",
    ECML-PKDD 2021; arXiv:2107.09305; code ``wxsh1213/prokt_text``).

    A teacher that "monitors the student": both networks train together, with two optimizers and
    manual optimisation. Each training step

    1. steps the teacher on ``(1 − λ)·CE(y, p_T) + λ·T²·KL(sg p_S ‖ p_T)`` (the student's
       prediction is detached: this step moves the teacher only);
    2. recomputes the teacher's logits in eval mode, without gradient;
    3. steps the student on ``T²·KL(p_T ‖ p_S)`` alone, towards those refreshed logits (no
       hard-label term, as in the paper).

    Defaults are the paper's, λ = 0.4 and T = 1. Whether the teacher starts from task-trained
    weights or from scratch is the caller's choice (pass the network as it should start): the
    paper's teacher follows the student along a path of local targets from its start, and which
    start it used in each experiment was not checked here (``method.teacher_init`` offers both).

    Steps return the detached ``student_logits``, the eval-mode ``teacher_logits`` ``(1, B, C)``
    and ``labels``, so :class:`~kd_lightning.callbacks.TeacherAgreementCallback` reports the
    teacher under ``teacher_name``. Logged as epoch means: ``{stage}/loss`` (the student's),
    ``{stage}/acc`` and ``train/teacher_loss``. Both networks are trained, so both are in
    checkpoints.

    Args:
        student: the network being distilled.
        teacher: the teacher network, trained alongside.
        teacher_name: the teacher's name in logs and summaries.
        constraint: λ, weight of the teacher's KL constraint towards the student.
        temperature: T of every softmax; the KL terms carry T².
        optimizer: builds the student's optimizer from its parameters.
        teacher_optimizer: builds the teacher's; defaults to ``optimizer``.
        scheduler: learning-rate schedule applied to both optimizers (stepped every batch), or
            ``None``.
        batch_adapter: turns a batch into ``(inputs, labels)``.

    Example:
        >>> module = ProKTModule(nn.Linear(4, 3), nn.Linear(4, 3), teacher_name="linear")
        >>> module.teacher_names, module(torch.randn(2, 4)).shape
        (['linear'], torch.Size([2, 3]))
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        teacher_name: str = "teacher",
        constraint: float = 0.4,
        temperature: float = 1.0,
        optimizer: OptimizerFactory = torch.optim.Adam,
        teacher_optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        batch_adapter: Callable[[Any], tuple[Any, Tensor]] | None = None,
    ) -> None:
        super().__init__(("loss", "acc", "teacher_loss"))
        if not 0.0 <= constraint <= 1.0:
            raise ValueError(f"constraint (λ) must lie in [0, 1], got {constraint}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.save_hyperparameters(
            ignore=[
                "student",
                "teacher",
                "optimizer",
                "teacher_optimizer",
                "scheduler",
                "batch_adapter",
            ]
        )
        self.automatic_optimization = False
        self.student = student
        self.teacher = teacher
        self.optimizer_factory = optimizer
        self.teacher_optimizer_factory = teacher_optimizer or optimizer
        self.scheduler_factory = scheduler
        self.batch_adapter = batch_adapter if batch_adapter is not None else BatchAdapter()

    @property
    def teacher_names(self) -> list[str]:
        """The one teacher's name."""
        return [self.hparams["teacher_name"]]

    def forward(self, inputs: Any) -> Tensor:
        """The student's logits."""
        return self.student(inputs)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        optimizers = self.optimizers()
        assert isinstance(optimizers, list)
        student_optimizer, teacher_optimizer = optimizers
        inputs, labels = self.batch_adapter(batch)
        temperature = self.hparams["temperature"]

        self.teacher.train()
        student_logits = self.student(inputs)
        teacher_loss = prokt_teacher_loss(
            self.teacher(inputs), student_logits, labels, self.hparams["constraint"], temperature
        )
        teacher_optimizer.zero_grad()
        self.manual_backward(teacher_loss)
        teacher_optimizer.step()

        teacher_logits = self._refreshed_teacher(inputs)
        student_loss = prokt_student_loss(student_logits, teacher_logits[0], temperature)
        student_optimizer.zero_grad()
        self.manual_backward(student_loss)
        student_optimizer.step()

        for schedule in self._schedules():
            schedule.step()
        return self._report(
            "train", student_loss.detach(), student_logits, teacher_logits, labels, teacher_loss
        )

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self._evaluate(batch, "test")

    def configure_optimizers(self) -> Any:
        total_steps = int(self.trainer.estimated_stepping_batches)
        built = [
            configure_optimizers(network.parameters(), factory, self.scheduler_factory, total_steps)
            for network, factory in (
                (self.student, self.optimizer_factory),
                (self.teacher, self.teacher_optimizer_factory),
            )
        ]
        if self.scheduler_factory is None:
            return built
        return [entry["optimizer"] for entry in built], [entry["lr_scheduler"] for entry in built]

    def _schedules(self) -> list[Any]:
        schedules = self.lr_schedulers()
        if schedules is None:
            return []
        return schedules if isinstance(schedules, list) else [schedules]

    def _refreshed_teacher(self, inputs: Any) -> Tensor:
        """The teacher's logits in eval mode, without gradient, stacked as ``(1, B, C)``."""
        was_training = self.teacher.training
        self.teacher.eval()
        with torch.no_grad():
            logits = self.teacher(inputs)
        self.teacher.train(was_training)
        return logits.unsqueeze(0)

    def _evaluate(self, batch: Any, stage: Stage) -> dict[str, Tensor]:
        inputs, labels = self.batch_adapter(batch)
        student_logits = self.student(inputs)
        teacher_logits = self._refreshed_teacher(inputs)
        loss = prokt_student_loss(student_logits, teacher_logits[0], self.hparams["temperature"])
        return self._report(stage, loss, student_logits, teacher_logits, labels)

    def _report(
        self,
        stage: Stage,
        loss: Tensor,
        student_logits: Tensor,
        teacher_logits: Tensor,
        labels: Tensor,
        teacher_loss: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Add the step to the epoch means (the teacher's loss only when it trained); the step's
        outputs for callbacks."""
        size = float(labels.shape[0])
        accuracy = (student_logits.argmax(-1) == labels).float().mean()
        teacher_weight = 0.0 if teacher_loss is None else size
        if teacher_loss is None:
            teacher_loss = loss.new_zeros(())
        self.update_epoch_means(stage, [loss, accuracy, teacher_loss], [size, size, teacher_weight])
        return {
            "loss": loss,
            "student_logits": student_logits.detach(),
            "teacher_logits": teacher_logits,
            "labels": labels,
        }
