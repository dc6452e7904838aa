"""Pro-KD: the student follows the teacher's training trajectory; the pipeline of ``method=prokd``."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from kd_lightning.losses.distillation import DistillationLoss
from kd_lightning.losses.schedules import SCHEDULE_KINDS, ScheduleKind, schedule_value
from kd_lightning.modules.classifier import ClassifierModule
from kd_lightning.modules.distillation import DistillationModule
from kd_lightning.modules.optim import OptimizerFactory, SchedulerFactory
from kd_lightning.modules.stages import NetworkSpec, StageRunner, build_network
from kd_lightning.teachers import TeacherEnsemble


def trajectory_index(epoch: int, max_epochs: int, num_checkpoints: int) -> int:
    """Which teacher checkpoint is the target in student epoch ``epoch`` (0-based): the
    checkpoints share the epochs evenly, in order, the last one ending training.

    Examples:
        >>> [trajectory_index(epoch, 6, 3) for epoch in range(6)]
        [0, 0, 1, 1, 2, 2]
    """
    if max_epochs < 1 or num_checkpoints < 1:
        raise ValueError("max_epochs and num_checkpoints must be positive")
    return min(num_checkpoints - 1, epoch * num_checkpoints // max_epochs)


class ProKDModule(DistillationModule):
    """Pro-KD (Rezagholizadeh et al., "Pro-KD: Progressive Distillation by Following the
    Footsteps of the Teacher", COLING 2022; arXiv:2110.08532). No public code.

    The student distils from successive checkpoints of the teacher's own training, from early to
    final, instead of from the final teacher alone, with a temperature that decreases over
    training. The paper's abstract fixes the idea; the details here are this library's choices:

    * targets: ``checkpoints`` (teacher state dicts, in training order) share the student's epochs
      evenly (:func:`trajectory_index`); the final checkpoint teaches the last share;
    * temperature: ``temperature_schedule`` from ``max_temperature`` to ``min_temperature`` over
      training progress (per optimizer step), see :func:`kd_lightning.losses.schedules.schedule_value`;
    * objective of each step: Hinton KD ``(1 − α)·CE + α·T²·KL(p_T ‖ p_S)``
      (:class:`~kd_lightning.DistillationLoss` with one teacher);
    * validation uses the current target; testing uses the final checkpoint at ``min_temperature``,
      so reported teacher statistics are those of the fully trained teacher.

    Checkpoints of this module hold the student only; on resume the target is picked again from
    the epoch.

    Args:
        student: the network being distilled.
        teacher: the teacher architecture; its weights are replaced by each checkpoint in turn.
        checkpoints: the teacher's state dicts along its training, earliest first.
        teacher_name: the teacher's name in logs and summaries.
        alpha: weight of the KD term.
        max_temperature: temperature at the start.
        min_temperature: temperature at the end.
        temperature_schedule: ``"linear"``, ``"cosine"``, ``"constant"`` or ``"ramp_up"``.
        optimizer, scheduler, batch_adapter: as for :class:`DistillationModule`.

    Examples:
        >>> teacher = nn.Linear(4, 3)
        >>> trajectory = [{k: torch.full_like(v, i) for k, v in teacher.state_dict().items()} for i in range(2)]
        >>> module = ProKDModule(nn.Linear(4, 3), teacher, trajectory, teacher_name="linear")
        >>> module.use_checkpoint(1); module.teachers.teachers["linear"].bias.tolist()
        [1.0, 1.0, 1.0]
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        checkpoints: Sequence[Mapping[str, Tensor]],
        teacher_name: str = "teacher",
        alpha: float = 0.5,
        max_temperature: float = 4.0,
        min_temperature: float = 1.0,
        temperature_schedule: ScheduleKind = "linear",
        optimizer: OptimizerFactory = torch.optim.Adam,
        scheduler: SchedulerFactory | None = None,
        batch_adapter: Callable[[Any], tuple[Any, Tensor]] | None = None,
    ) -> None:
        if not checkpoints:
            raise ValueError("ProKDModule needs at least one teacher checkpoint")
        self.check_settings(alpha, max_temperature, min_temperature, temperature_schedule)
        with warnings.catch_warnings():  # the parent records this frame's arguments too
            warnings.filterwarnings("ignore", ".*is an instance of `nn.Module`.*")
            super().__init__(
                student,
                {teacher_name: teacher},
                DistillationLoss("mean_probs", alpha=alpha, temperature=max_temperature),
                optimizer=optimizer,
                scheduler=scheduler,
                batch_adapter=batch_adapter,
            )
        for unsaved in ("teacher", "checkpoints"):  # weights, not hyper-parameters
            self.hparams.pop(unsaved, None)
        self.checkpoints = [dict(state) for state in checkpoints]
        self.teacher_name = teacher_name
        self.current_checkpoint = len(self.checkpoints) - 1
        self.use_checkpoint(self.current_checkpoint)

    @staticmethod
    def check_settings(
        alpha: float, max_temperature: float, min_temperature: float, temperature_schedule: str
    ) -> None:
        """Refuse settings the constructor would refuse, before any teacher is trained.

        Examples:
            >>> ProKDModule.check_settings(0.5, 4.0, 0.0, "linear")
            Traceback (most recent call last):
            ...
            ValueError: min_temperature must be positive, got 0.0 (max_temperature=4.0)
        """
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if temperature_schedule not in SCHEDULE_KINDS:
            raise ValueError(
                f"temperature_schedule={temperature_schedule!r} is not one of "
                f"{list(SCHEDULE_KINDS)}"
            )
        if max_temperature <= 0:
            raise ValueError(f"max_temperature must be positive, got {max_temperature}")
        if min_temperature <= 0:
            raise ValueError(
                f"min_temperature must be positive, got {min_temperature} "
                f"(max_temperature={max_temperature})"
            )

    def use_checkpoint(self, index: int) -> None:
        """Load the teacher's checkpoint ``index`` (0 = earliest) into the teacher."""
        ensemble = cast(TeacherEnsemble, self.teachers)  # built here from one live network
        ensemble.teachers[self.teacher_name].load_state_dict(self.checkpoints[index])
        self.current_checkpoint = index

    def temperature_at(self, progress: float) -> float:
        """The temperature at training progress ``progress`` in [0, 1]."""
        return schedule_value(
            self.hparams["temperature_schedule"],
            self.hparams["max_temperature"],
            self.hparams["min_temperature"],
            progress,
        )

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        max_epochs = self.trainer.max_epochs or 1
        self.use_checkpoint(trajectory_index(self.current_epoch, max_epochs, len(self.checkpoints)))
        self._temperatures: list[float] = []

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        total = max(1, int(self.trainer.estimated_stepping_batches) - 1)
        self.loss.temperature = self.temperature_at(self.global_step / total)
        self._temperatures.append(self.loss.temperature)

    def on_train_epoch_end(self) -> None:
        """Log the epoch's mean temperature and the teacher checkpoint it followed, once."""
        super().on_train_epoch_end()
        if self._temperatures:
            mean = sum(self._temperatures) / len(self._temperatures)
            self.log("train/temperature", mean, sync_dist=True)
        self.log("train/teacher_checkpoint", float(self.current_checkpoint), sync_dist=True)

    def on_test_start(self) -> None:
        self.use_checkpoint(len(self.checkpoints) - 1)
        self.loss.temperature = self.hparams["min_temperature"]


def prokd_pipeline(
    student: nn.Module,
    stages: StageRunner,
    teacher: NetworkSpec | None,
    teacher_name: str | None,
    teacher_seed: int = 0,
    teacher_optimizer: OptimizerFactory = torch.optim.Adam,
    teacher_epochs: int = 60,
    num_checkpoints: int = 4,
    alpha: float = 0.5,
    max_temperature: float = 4.0,
    min_temperature: float = 1.0,
    temperature_schedule: ScheduleKind = "linear",
    optimizer: OptimizerFactory = torch.optim.Adam,
    scheduler: SchedulerFactory | None = None,
) -> ProKDModule:
    """``method=prokd``: train ``teacher`` from scratch on labels for ``teacher_epochs``, keeping
    ``num_checkpoints`` states along the way (stage ``prokd-<teacher_name>``, files
    ``prokd-<teacher_name>-<i>.safetensors``), then :class:`ProKDModule` distils the student from
    them in order.

    Takes ``stages``, not ``teachers``: the trajectory is trained here, not loaded.

    Args:
        student: the network distilled.
        stages: runs the teacher's trajectory stage.
        teacher: the teacher's network, or a factory of it (``kd-train``: the first configured
            teacher's architecture, which must have no input_transform or class_map).
        teacher_name: its name in logs and in the stage's files.
        teacher_seed: seeds the teacher before it is built and trained (``kd-train``: its
            ``fit.seed``).
        teacher_optimizer: the teacher's optimizer (``kd-train``: its ``fit.optimizer``); the
            schedule is ``scheduler``.
        teacher_epochs: epochs of the teacher's training.
        num_checkpoints: states kept along it.
        alpha, max_temperature, min_temperature, temperature_schedule, optimizer, scheduler: as
            for :class:`ProKDModule`.

    Examples:
        >>> prokd_pipeline(nn.Linear(4, 3), None, None, "cnn")
        Traceback (most recent call last):
        ...
        ValueError: teacher is None: Pro-KD trains a plain network of the student's inputs and classes (kd-train: the first configured teacher's architecture, which must have no input_transform or class_map)
    """
    if teacher is None or teacher_name is None:
        raise ValueError(
            "teacher is None: Pro-KD trains a plain network of the student's inputs and classes "
            "(kd-train: the first configured teacher's architecture, which must have no "
            "input_transform or class_map)"
        )
    ProKDModule.check_settings(alpha, max_temperature, min_temperature, temperature_schedule)
    network = build_network(teacher, teacher_seed)
    checkpoints = stages.trajectory(
        f"prokd-{teacher_name}",
        network,
        lambda: ClassifierModule(network, optimizer=teacher_optimizer, scheduler=scheduler),
        teacher_epochs,
        num_checkpoints,
    )
    return ProKDModule(
        student,
        network,
        checkpoints,
        teacher_name=teacher_name,
        alpha=alpha,
        max_temperature=max_temperature,
        min_temperature=min_temperature,
        temperature_schedule=temperature_schedule,
        optimizer=optimizer,
        scheduler=scheduler,
    )
