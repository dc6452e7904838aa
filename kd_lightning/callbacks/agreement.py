"""Log how each teacher agrees with the labels, the student and the other teachers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from kd_lightning.metrics import TeacherAgreement, with_teacher_dims
from kd_lightning.metrics.agreement import CHUNK_TOKENS

STAGES = ("train", "val", "test")


class StageCallback(Callback):
    """A callback for some of the ``train``/``val``/``test`` stages: Lightning's batch-end and
    epoch-end hooks of those stages call :meth:`on_stage_batch_end` and :meth:`on_stage_epoch_end`
    with the stage's name; the sanity check's validation calls neither.

    Args:
        stages: the stages to follow.
        allowed: the stages this callback can follow.

    Raises:
        ValueError: for a stage not in ``allowed``.

    Examples:
        >>> class Report(StageCallback):
        ...     def on_stage_epoch_end(self, stage, trainer, pl_module):
        ...         print(f"{stage} epoch {trainer.current_epoch} ended")
        >>> Report(stages=("val", "test")).stages
        ('val', 'test')
        >>> Report(stages=("predict",))
        Traceback (most recent call last):
        ...
        ValueError: unknown stages ['predict']; choose from ['train', 'val', 'test']
    """

    def __init__(self, stages: Sequence[str], allowed: Sequence[str] = STAGES) -> None:
        unknown = set(stages) - set(allowed)
        if unknown:
            raise ValueError(f"unknown stages {sorted(unknown)}; choose from {list(allowed)}")
        self.stages = tuple(stages)

    def on_stage_batch_end(
        self, stage: str, trainer: Trainer, pl_module: LightningModule, outputs: Any
    ) -> None:
        """A batch of ``stage`` ended with the step's ``outputs``; does nothing by default."""

    def on_stage_epoch_end(self, stage: str, trainer: Trainer, pl_module: LightningModule) -> None:
        """An epoch of ``stage`` ended; does nothing by default."""

    def _batch_end(
        self, stage: str, trainer: Trainer, pl_module: LightningModule, outputs: Any
    ) -> None:
        if stage in self.stages and not trainer.sanity_checking:
            self.on_stage_batch_end(stage, trainer, pl_module, outputs)

    def _epoch_end(self, stage: str, trainer: Trainer, pl_module: LightningModule) -> None:
        if stage in self.stages and not trainer.sanity_checking:
            self.on_stage_epoch_end(stage, trainer, pl_module)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batch_end("train", trainer, pl_module, outputs)

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batch_end("val", trainer, pl_module, outputs)

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batch_end("test", trainer, pl_module, outputs)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_end("train", trainer, pl_module)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_end("val", trainer, pl_module)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_end("test", trainer, pl_module)


class TeacherAgreementCallback(StageCallback):
    """Log per-teacher agreement statistics at the end of each epoch, to any Lightning logger.

    Works with any module whose steps return a dict with ``student_logits``, ``teacher_logits``
    (or ``teacher_topk``, top-k outputs that are expanded ``chunk_tokens`` positions at a time)
    and ``labels`` (and optionally ``teacher_indices`` when only some teachers ran,
    ``fusion_weights`` and, for token-level outputs, a ``mask`` of real tokens), and that names the
    teachers (or peers) in ``teacher_names`` — as :class:`~kd_lightning.DistillationModule` does.
    Counts are accumulated in a :class:`~kd_lightning.metrics.TeacherAgreement`, so values are
    exact under DDP, and each teacher's count only the teachers that ran (e.g. the teachers a
    :class:`~kd_lightning.teachers.DrawnTeachers` drew). Keys, for a teacher ``cnn`` in stage
    ``val``:

    * ``val/agreement/student_vs_cnn`` — top-1 agreement of the student with the teacher;
    * ``val/agreement/cnn_vs_gru`` — top-1 agreement between two teachers (each pair once);
    * ``val/teacher_acc/cnn`` — the teacher's accuracy;
    * ``val/teacher_ce/cnn`` — its mean cross-entropy on the labels (per real token for a
      language model: the log of its perplexity);
    * ``val/kl/cnn_to_student`` — KL(p_cnn ‖ p_student) at T = 1;
    * ``val/fusion_weight/cnn`` — the teacher's mean fusion weight;
    * ``val/ensemble/{accuracy,ce,disagreement,jsd}`` — the ensemble (mean of probabilities)
      as a whole.

    A value with nothing counted in the epoch (a teacher never drawn, a pair never drawn together,
    the ensemble when never all teachers ran) is not logged. The last computed statistics of each
    stage stay in ``latest[stage]`` (the dict of :meth:`TeacherAgreement.compute`, with ``(K,)``
    and ``(K, K)`` shapes even for one teacher), for plots and summaries.

    Args:
        stages: which of ``"train"``, ``"val"``, ``"test"`` to log.
        chunk_tokens: positions of top-k teacher outputs expanded at once (see
            :meth:`~kd_lightning.metrics.TeacherAgreement.update`).

    Examples:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[TeacherAgreementCallback(stages=("val",))], logger=False)
    """

    def __init__(self, stages: Sequence[str] = STAGES, chunk_tokens: int = CHUNK_TOKENS) -> None:
        super().__init__(stages)
        self.chunk_tokens = chunk_tokens
        self.metrics: dict[str, TeacherAgreement] = {}
        self.names: list[str] = []
        self.latest: dict[str, dict[str, Tensor]] = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        names = getattr(pl_module, "teacher_names", None)
        if names is None:
            raise TypeError(
                f"{type(pl_module).__name__} has no `teacher_names`: TeacherAgreementCallback "
                f"needs a module like DistillationModule"
            )
        self.names = list(names)
        self.metrics = {
            name: TeacherAgreement(len(self.names), self.chunk_tokens).to(pl_module.device)
            for name in self.stages
        }

    def on_stage_batch_end(
        self, stage: str, trainer: Trainer, pl_module: LightningModule, outputs: Any
    ) -> None:
        if not isinstance(outputs, Mapping):
            return
        teachers = outputs.get("teacher_topk", outputs.get("teacher_logits"))
        if teachers is None:
            return
        metric = self.metrics[stage]
        metric.to(outputs["student_logits"].device)
        metric.update(
            outputs["student_logits"],
            teachers,
            outputs["labels"],
            outputs.get("fusion_weights"),
            mask=outputs.get("mask"),
            teacher_indices=outputs.get("teacher_indices"),
        )

    def on_stage_epoch_end(self, stage: str, trainer: Trainer, pl_module: LightningModule) -> None:
        metric = self.metrics[stage]
        if not metric.update_called:
            return
        computed = {key: value.detach().cpu() for key, value in metric.compute().items()}
        self.latest[stage] = with_teacher_dims(computed, len(self.names))
        values = agreement_log_dict(stage, self.names, self.latest[stage])
        metric.reset()
        pl_module.log_dict(values, on_step=False, on_epoch=True)


def agreement_log_dict(
    stage: str, names: Sequence[str], values: Mapping[str, Tensor]
) -> dict[str, float]:
    """Flatten :meth:`TeacherAgreement.compute` output into ``stage/group/name`` log keys,
    leaving out the values with nothing counted (NaN).

    Examples:
        >>> import torch
        >>> metric = TeacherAgreement(num_teachers=1)
        >>> metric.update(torch.eye(2), torch.eye(2)[None], torch.tensor([0, 1]))
        >>> agreement_log_dict("val", ["cnn"], metric.compute())["val/agreement/student_vs_cnn"]
        1.0
    """
    k = len(names)
    shaped = with_teacher_dims(dict(values), k)
    agreement, accuracy, ce = (
        shaped["student_agreement"],
        shaped["teacher_accuracy"],
        shaped["teacher_ce"],
    )
    kl, weights, pairwise = (
        shaped["student_kl"],
        shaped["fusion_weight"],
        shaped["pairwise_agreement"],
    )
    logs: dict[str, Tensor] = {}
    for index, name in enumerate(names):
        logs[f"{stage}/agreement/student_vs_{name}"] = agreement[index]
        logs[f"{stage}/teacher_acc/{name}"] = accuracy[index]
        logs[f"{stage}/teacher_ce/{name}"] = ce[index]
        logs[f"{stage}/kl/{name}_to_student"] = kl[index]
        logs[f"{stage}/fusion_weight/{name}"] = weights[index]
        for other in range(index + 1, k):
            logs[f"{stage}/agreement/{name}_vs_{names[other]}"] = pairwise[index, other]
    logs[f"{stage}/ensemble/accuracy"] = values["ensemble_accuracy"]
    logs[f"{stage}/ensemble/ce"] = values["ensemble_ce"]
    logs[f"{stage}/ensemble/disagreement"] = values["disagreement"]
    logs[f"{stage}/ensemble/jsd"] = values["ensemble_jsd"]
    return {key: value.item() for key, value in logs.items() if not value.isnan()}
