"""Draw the pairwise teacher agreement of each validation and test epoch as a heatmap."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from matplotlib.figure import Figure

from kd_lightning.callbacks.agreement import StageCallback, TeacherAgreementCallback
from kd_lightning.reporting.plots import agreement_heatmap

HEATMAP_STAGES = ("val", "test")


class AgreementHeatmapCallback(StageCallback):
    """Save and log a heatmap of the pairwise teacher agreement at the end of each epoch.

    Reads the statistics that a :class:`TeacherAgreementCallback` computed for the same epoch, so
    it must come after that callback in ``Trainer(callbacks=[...])``. Validation epochs (not the
    sanity check) and test epochs are drawn; on global rank zero the heatmap is written to
    ``dirpath/agreement_{stage}.png`` (overwritten each epoch) and logged as
    ``{stage}/agreement_heatmap`` to every :class:`~lightning.pytorch.loggers.WandbLogger` and
    :class:`~lightning.pytorch.loggers.TensorBoardLogger`; other loggers are skipped.

    Args:
        stages: which of ``"val"`` and ``"test"`` to draw.
        dirpath: where to save the PNGs; defaults to ``trainer.log_dir``, else
            ``trainer.default_root_dir``.

    Raises:
        ValueError: for an unknown stage.

    Examples:
        >>> from lightning.pytorch import Trainer
        >>> callbacks = [TeacherAgreementCallback(), AgreementHeatmapCallback(stages=("val",))]
        >>> trainer = Trainer(callbacks=callbacks, logger=False)
    """

    def __init__(self, stages: Sequence[str] = HEATMAP_STAGES, dirpath: str | None = None) -> None:
        super().__init__(stages, HEATMAP_STAGES)
        self.dirpath = dirpath
        self._agreement: TeacherAgreementCallback | None = None
        self._resolved_dirpath = Path(".")

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        callbacks = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning at runtime
        self._agreement = _preceding_agreement_callback(callbacks, self)
        untracked = [name for name in self.stages if name not in self._agreement.stages]
        if untracked:
            raise ValueError(
                f"AgreementHeatmapCallback draws stages {untracked} that "
                f"TeacherAgreementCallback(stages={self._agreement.stages}) does not track"
            )
        # trainer.log_dir broadcasts, so it is resolved here, on every process
        self._resolved_dirpath = Path(self.dirpath or trainer.log_dir or trainer.default_root_dir)

    def on_stage_epoch_end(self, stage: str, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero or self._agreement is None:
            return
        values = self._agreement.latest.get(stage)
        if values is None:  # no batch reached the agreement callback in this stage
            return
        names = self._agreement.names
        title = f"Pairwise teacher agreement ({stage}, epoch {trainer.current_epoch})"
        fig = agreement_heatmap(values["pairwise_agreement"], names, title)
        self._resolved_dirpath.mkdir(parents=True, exist_ok=True)
        fig.savefig(self._resolved_dirpath / f"agreement_{stage}.png")
        _log_figure(trainer, f"{stage}/agreement_heatmap", fig)


def _preceding_agreement_callback(
    callbacks: Sequence[Callback], heatmap: AgreementHeatmapCallback
) -> TeacherAgreementCallback:
    """The last TeacherAgreementCallback registered before ``heatmap``; raise if there is none."""
    position = next(index for index, callback in enumerate(callbacks) if callback is heatmap)
    agreements = [
        (index, callback)
        for index, callback in enumerate(callbacks)
        if isinstance(callback, TeacherAgreementCallback)
    ]
    if not agreements:
        raise RuntimeError(
            "AgreementHeatmapCallback needs a TeacherAgreementCallback: pass "
            "Trainer(callbacks=[TeacherAgreementCallback(), AgreementHeatmapCallback()])"
        )
    before = [callback for index, callback in agreements if index < position]
    if not before:
        raise RuntimeError(
            f"AgreementHeatmapCallback (callback {position}) runs before TeacherAgreementCallback "
            f"(callback {agreements[0][0]}) and would draw stale agreement: list it after, as in "
            "Trainer(callbacks=[TeacherAgreementCallback(), AgreementHeatmapCallback()])"
        )
    return before[-1]


def _log_figure(trainer: Trainer, key: str, fig: Figure) -> None:
    """Log ``fig`` to each logger of ``trainer`` that takes images, at the global step."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[fig], step=trainer.global_step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_figure(key, fig, global_step=trainer.global_step, close=False)
