"""Pro-KD: the student follows the teacher's training trajectory."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from kd_lightning.losses.distillation import DistillationLoss
from kd_lightning.losses.schedules import SCHEDULE_KINDS, ScheduleKind, schedule_value
from kd_lightning.modules.distillation import DistillationModule
from kd_lightning.modules.optim import OptimizerFactory, SchedulerFactory
from kd_lightning.teachers import TeacherEnsemble


def trajectory_index(epoch: int, max_epochs: int, num_checkpoints: int) -> int:
    """Which teacher checkpoint is the target in student epoch ``epoch`` (0-based): the
    checkpoints share the epochs evenly, in order, the last one ending training.

    Example:
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

    Example:
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
        """Refuse settings the constructor would refuse, before any teacher is trained."""
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if temperature_schedule not in SCHEDULE_KINDS:
            raise ValueError(
                f"unknown temperature_schedule {temperature_schedule!r}; choose one of "
                f"{list(SCHEDULE_KINDS)}"
            )
        if min(max_temperature, min_temperature) <= 0:
            raise ValueError(
                f"temperatures must be positive, got max_temperature={max_temperature}, "
                f"min_temperature={min_temperature}"
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
