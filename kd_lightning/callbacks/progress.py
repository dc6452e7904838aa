"""A progress bar that says what is being trained."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar


class LabelledProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar with a label before the epoch, e.g. ``teacher gru · epoch 3/60``.

    Examples:
        >>> bar = LabelledProgressBar("teacher cnn")
        >>> bar.label
        'teacher cnn'
    """

    def __init__(self, label: str, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.label = label

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self.train_progress_bar.set_description(
            f"{self.label} · epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"
        )


def progress_bar(label: str, enabled: bool = True) -> list[Callback]:
    """A labelled bar as a callback list, or none when ``enabled`` is false (the value of the
    Trainer's ``enable_progress_bar``).

    Examples:
        >>> [bar.label for bar in progress_bar("student")], progress_bar("student", enabled=False)
        (['student'], [])
    """
    return [LabelledProgressBar(label)] if enabled else []
