"""Log how each teacher agrees with the labels, the student and the other teachers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from kd_lightning.metrics import TeacherAgreement, with_teacher_dims

STAGES = ("train", "val", "test")


class TeacherAgreementCallback(Callback):
    """Log per-teacher agreement statistics at the end of each epoch, to any Lightning logger.

    Works with any module whose steps return a dict with ``student_logits``, ``teacher_logits``
    and ``labels`` (and optionally ``fusion_weights`` and, for token-level outputs, a ``mask`` of
    real tokens), and that names the teachers (or peers) in ``teacher_names`` — as
    :class:`~kd_lightning.DistillationModule` does. Counts are accumulated in a
    :class:`~kd_lightning.metrics.TeacherAgreement`, so values are exact under DDP. Keys, for a
    teacher ``cnn`` in stage ``val``:

    * ``val/agreement/student_vs_cnn`` — top-1 agreement of the student with the teacher;
    * ``val/agreement/cnn_vs_gru`` — top-1 agreement between two teachers (each pair once);
    * ``val/teacher_acc/cnn`` — the teacher's accuracy;
    * ``val/kl/cnn_to_student`` — KL(p_cnn ‖ p_student) at T = 1;
    * ``val/fusion_weight/cnn`` — the teacher's mean fusion weight;
    * ``val/ensemble/{accuracy,disagreement,jsd}`` — the ensemble as a whole.

    The last computed statistics of each stage stay in ``latest[stage]`` (the dict of
    :meth:`TeacherAgreement.compute`, with ``(K,)`` and ``(K, K)`` shapes even for one teacher),
    for plots and summaries.

    Args:
        stages: which of ``"train"``, ``"val"``, ``"test"`` to log.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[TeacherAgreementCallback(stages=("val",))], logger=False)
    """

    def __init__(self, stages: Sequence[str] = STAGES) -> None:
        unknown = set(stages) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stages {sorted(unknown)}; choose from {list(STAGES)}")
        self.stages = tuple(stages)
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
            name: TeacherAgreement(len(self.names)).to(pl_module.device) for name in self.stages
        }

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._update("train", outputs)

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking:
            self._update("val", outputs)

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._update("test", outputs)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log("train", pl_module)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log("val", pl_module)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log("test", pl_module)

    def _update(self, stage: str, outputs: Any) -> None:
        metric = self.metrics.get(stage)
        if metric is None or not isinstance(outputs, Mapping) or "teacher_logits" not in outputs:
            return
        metric.to(outputs["student_logits"].device)
        metric.update(
            outputs["student_logits"],
            outputs["teacher_logits"],
            outputs["labels"],
            outputs.get("fusion_weights"),
            mask=outputs.get("mask"),
        )

    def _log(self, stage: str, pl_module: LightningModule) -> None:
        metric = self.metrics.get(stage)
        if metric is None or not metric.update_called:
            return
        computed = {key: value.detach().cpu() for key, value in metric.compute().items()}
        self.latest[stage] = with_teacher_dims(computed, len(self.names))
        values = agreement_log_dict(stage, self.names, self.latest[stage])
        metric.reset()
        pl_module.log_dict(values, on_step=False, on_epoch=True)


def agreement_log_dict(
    stage: str, names: Sequence[str], values: Mapping[str, Tensor]
) -> dict[str, float]:
    """Flatten :meth:`TeacherAgreement.compute` output into ``stage/group/name`` log keys.

    Example:
        >>> import torch
        >>> metric = TeacherAgreement(num_teachers=1)
        >>> metric.update(torch.eye(2), torch.eye(2)[None], torch.tensor([0, 1]))
        >>> agreement_log_dict("val", ["cnn"], metric.compute())["val/agreement/student_vs_cnn"]
        1.0
    """
    k = len(names)
    shaped = with_teacher_dims(dict(values), k)
    agreement, accuracy = shaped["student_agreement"], shaped["teacher_accuracy"]
    kl, weights, pairwise = (
        shaped["student_kl"],
        shaped["fusion_weight"],
        shaped["pairwise_agreement"],
    )
    logs: dict[str, float] = {}
    for index, name in enumerate(names):
        logs[f"{stage}/agreement/student_vs_{name}"] = agreement[index].item()
        logs[f"{stage}/teacher_acc/{name}"] = accuracy[index].item()
        logs[f"{stage}/kl/{name}_to_student"] = kl[index].item()
        if not weights[index].isnan():  # NaN when no fusion weights were given
            logs[f"{stage}/fusion_weight/{name}"] = weights[index].item()
        for other in range(index + 1, k):
            logs[f"{stage}/agreement/{name}_vs_{names[other]}"] = pairwise[index, other].item()
    logs[f"{stage}/ensemble/accuracy"] = values["ensemble_accuracy"].item()
    logs[f"{stage}/ensemble/disagreement"] = values["disagreement"].item()
    logs[f"{stage}/ensemble/jsd"] = values["ensemble_jsd"].item()
    return logs
