"""ProKT: a teacher trained alongside the student and held near it; the pipeline of
``method=prokt``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from kd_lightning.functional import prokt_student_loss, prokt_teacher_loss
from kd_lightning.modules.base import MethodModule
from kd_lightning.modules.epoch_means import Stage
from kd_lightning.modules.optim import OptimizerFactory, SchedulerFactory
from kd_lightning.modules.stages import NetworkSpec, StageRunner, build_network
from kd_lightning.teachers import load_teacher

PROKT_TEACHER_INITS = ("pretrained", "scratch")


class ProKTModule(MethodModule):
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
    weights or from scratch is the caller's choice (pass the network as it should start, or see
    :func:`prokt_pipeline`): the paper's teacher follows the student along a path of local
    targets from its start, and which start it used in each experiment was not checked here.

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

    Examples:
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
        super().__init__(
            ("loss", "acc", "teacher_loss"), optimizer, scheduler, "step", batch_adapter
        )
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
        self.teacher_optimizer_factory = teacher_optimizer or optimizer

    @property
    def teacher_names(self) -> list[str]:
        """The one teacher's name."""
        return [self.hparams["teacher_name"]]

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

        self.step_schedulers(end_of_epoch=False)
        return self._report(
            "train", student_loss.detach(), student_logits, teacher_logits, labels, teacher_loss
        )

    def step(self, batch: Any, stage: Stage) -> dict[str, Tensor]:
        """Validation and test: the student's loss towards the eval-mode teacher."""
        inputs, labels = self.batch_adapter(batch)
        student_logits = self.student(inputs)
        teacher_logits = self._refreshed_teacher(inputs)
        loss = prokt_student_loss(student_logits, teacher_logits[0], self.hparams["temperature"])
        return self._report(stage, loss, student_logits, teacher_logits, labels)

    def configure_optimizers(self) -> Any:
        return [
            self.optimizer_config(self.student.parameters()),
            self.optimizer_config(self.teacher.parameters(), self.teacher_optimizer_factory),
        ]

    def _refreshed_teacher(self, inputs: Any) -> Tensor:
        """The teacher's logits in eval mode, without gradient, stacked as ``(1, B, C)``."""
        was_training = self.teacher.training
        self.teacher.eval()
        with torch.no_grad():
            logits = self.teacher(inputs)
        self.teacher.train(was_training)
        return logits.unsqueeze(0)

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


def prokt_pipeline(
    student: nn.Module,
    stages: StageRunner,
    teacher: NetworkSpec | None,
    teacher_name: str | None,
    teacher_init: Literal["pretrained", "scratch"] = "pretrained",
    teacher_seed: int = 0,
    constraint: float = 0.4,
    temperature: float = 1.0,
    optimizer: OptimizerFactory = torch.optim.Adam,
    scheduler: SchedulerFactory | None = None,
) -> ProKTModule:
    """``method=prokt``: :class:`ProKTModule` with ``teacher`` trained alongside the student,
    starting from the pretrained weights of configured teacher ``teacher_name``
    (``teacher_init="pretrained"``, :meth:`StageRunner.pretrained_weights
    <kd_lightning.modules.stages.StageRunner.pretrained_weights>`: in ``kd-train`` the cached or
    given weights, the teacher trained once if missing) or from scratch (``"scratch"``).

    Takes ``stages``, not ``teachers``: ``kd-train`` builds no frozen ensemble for it.

    Args:
        student: the network distilled.
        stages: gives the pretrained teacher's weights.
        teacher: the teacher's network, or a factory of it (``kd-train``: the first configured
            teacher's architecture, which must have no input_transform or class_map).
        teacher_name: its name in logs, and the configured teacher whose weights it starts from.
        teacher_init: ``"pretrained"`` or ``"scratch"``.
        teacher_seed: seeds the teacher's initialisation (``kd-train``: its ``fit.seed``).
        constraint, temperature, optimizer, scheduler: as for :class:`ProKTModule`.

    Examples:
        >>> module = prokt_pipeline(
        ...     nn.Linear(4, 3), StageRunner(None, "unused", {}), nn.Linear(4, 3), "linear",
        ...     teacher_init="scratch",
        ... )
        >>> module.teacher_names
        ['linear']
    """
    if teacher_init not in PROKT_TEACHER_INITS:
        raise ValueError(f"teacher_init={teacher_init!r} is not one of {list(PROKT_TEACHER_INITS)}")
    if teacher is None or teacher_name is None:
        raise ValueError(
            "teacher is None: ProKT trains a plain network of the student's inputs and classes "
            "alongside it (kd-train: the first configured teacher's architecture, which must "
            "have no input_transform or class_map)"
        )
    network = build_network(teacher, teacher_seed)
    module = ProKTModule(
        student,
        network,
        teacher_name=teacher_name,
        constraint=constraint,
        temperature=temperature,
        optimizer=optimizer,
        scheduler=scheduler,
    )
    if teacher_init == "pretrained":
        load_teacher(network, stages.pretrained_weights(teacher_name), name=teacher_name)
    return module
