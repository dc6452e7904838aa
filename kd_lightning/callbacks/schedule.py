"""Drive a loss hyper-parameter (e.g. the temperature or α) along a schedule during training."""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer

from kd_lightning.losses.schedules import SCHEDULE_KINDS, ScheduleKind, schedule_value


class LossSchedule(Callback):
    """Set ``pl_module.loss.<attribute>`` from a schedule before every training step or epoch.

    The value depends only on the trainer's progress (global step or epoch), so a resumed run
    continues the schedule where it stopped. The last value set is also kept in checkpoints and
    set back when fitting resumes, so a run resumed after its last training step (only testing
    left) evaluates with the scheduled value, not the config's. The current value is logged as
    ``train/schedule/<attribute>``. Works with any module whose ``loss`` has the attribute, as
    :class:`~kd_lightning.DistillationLoss` has ``temperature`` and ``alpha``.

    Args:
        attribute: the loss attribute to drive, e.g. ``"temperature"`` or ``"alpha"``.
        start: value at the start of training.
        end: value at the end of training.
        kind: ``"constant"``, ``"linear"``, ``"cosine"`` or ``"ramp_up"``.
        interval: update every ``"step"`` or every ``"epoch"``.

    Examples:
        >>> schedule = LossSchedule("temperature", start=8.0, end=2.0, kind="cosine")
        >>> schedule.value(0.5)
        5.0
    """

    def __init__(
        self,
        attribute: str,
        start: float,
        end: float,
        kind: ScheduleKind = "linear",
        interval: Literal["step", "epoch"] = "step",
    ) -> None:
        if kind not in SCHEDULE_KINDS:
            raise ValueError(
                f"unknown schedule kind {kind!r}; choose one of {list(SCHEDULE_KINDS)}"
            )
        if interval not in ("step", "epoch"):
            raise ValueError(f"interval must be 'step' or 'epoch', got {interval!r}")
        self.attribute = attribute
        self.start, self.end, self.kind, self.interval = start, end, kind, interval
        self.current: float | None = None
        self._restored: float | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(attribute=self.attribute)

    def state_dict(self) -> dict[str, Any]:
        return {"current": self.current}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict.get("current")

    def value(self, progress: float) -> float:
        """The scheduled value at ``progress`` in [0, 1]."""
        return schedule_value(self.kind, self.start, self.end, progress)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        loss = getattr(pl_module, "loss", None)
        if loss is None or not hasattr(loss, self.attribute):
            raise AttributeError(
                f"LossSchedule('{self.attribute}'): {type(pl_module).__name__}.loss has no attribute "
                f"'{self.attribute}'"
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._set_restored(pl_module)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._set_restored(pl_module)  # strategies that restore checkpoints after on_fit_start

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.interval == "step":
            self._apply(
                pl_module, trainer.global_step / max(1, int(trainer.estimated_stepping_batches) - 1)
            )

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.interval == "epoch":
            self._apply(pl_module, trainer.current_epoch / max(1, (trainer.max_epochs or 1) - 1))

    def _set_restored(self, pl_module: LightningModule) -> None:
        if self._restored is not None:
            self.current, self._restored = self._restored, None
            setattr(pl_module.loss, self.attribute, self.current)

    def _apply(self, pl_module: LightningModule, progress: float) -> None:
        value = self.value(progress)
        self.current = value
        setattr(pl_module.loss, self.attribute, value)
        per_step = self.interval == "step"
        pl_module.log(
            f"train/schedule/{self.attribute}", value, on_step=per_step, on_epoch=not per_step
        )
