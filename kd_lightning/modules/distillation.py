"""Distil a student from a frozen ensemble of teachers with Lightning."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn

from kd_lightning.batch import BatchAdapter
from kd_lightning.data.indexed import sample_indices
from kd_lightning.losses.distillation import DistillationLoss
from kd_lightning.losses.hints import FeatureHintLoss
from kd_lightning.models.taps import FeatureTaps
from kd_lightning.modules.epoch_means import EpochMeans, Stage
from kd_lightning.modules.optim import OptimizerFactory, SchedulerFactory, configure_optimizers
from kd_lightning.teachers import TeacherEnsemble
from kd_lightning.teachers.cache.store import CachedTeachers
from kd_lightning.teachers.sharded import ShardedTeachers


class DistillationModule(EpochMeans):
    """Train ``student`` against frozen ``teachers`` with a :class:`~kd_lightning.DistillationLoss`.

    Each train/val/test step runs the teachers once and returns the detached student logits,
    teacher logits, labels and fusion weights, so callbacks (e.g.
    :class:`~kd_lightning.callbacks.TeacherAgreementCallback`) never run a teacher again. Logged:
    ``{stage}/loss``, ``{stage}/ce``, ``{stage}/kd`` and ``{stage}/acc``.

    Token-level outputs work too: logits ``(B, L, V)`` with labels ``(B, L)`` whose padded
    positions hold the loss's ``ignore_index``; accuracy then counts real tokens only, and the
    step also returns ``"mask"`` ``(B, L)``, true at real tokens.

    Only the student and the loss's learnable parameters (e.g. learnable fusion weights) are
    optimised. Checkpoints hold no teacher weights unless ``save_teachers=True``; loading a
    student-only checkpoint leaves the teachers as they are.

    Args:
        student: the network being trained.
        teachers: a :class:`~kd_lightning.teachers.TeacherEnsemble` or a ``name → model`` mapping;
            or :class:`~kd_lightning.teachers.CachedTeachers`, whose logits are read
            by sample index (batches from :class:`~kd_lightning.data.indexed.IndexedDataModule`;
            the stage names the split) instead of running teachers.
        loss: the objective; defaults to ``DistillationLoss()`` (mean of probabilities, α = 0.9, T = 4).
        optimizer: called with the trainable parameters, e.g. ``functools.partial(torch.optim.Adam, lr=1e-2)``.
        scheduler: called with the optimizer (and ``total_steps=trainer.estimated_stepping_batches``
            when it takes a ``total_steps`` argument); ``None`` for a constant learning rate.
        scheduler_interval: ``"step"`` or ``"epoch"``.
        batch_adapter: turns a batch into ``(inputs, labels)``; defaults to :class:`~kd_lightning.BatchAdapter`.
        save_teachers: keep teacher weights in checkpoints.
        hints: a :class:`~kd_lightning.losses.hints.FeatureHintLoss`: the student's and teachers' named
            layers are tapped by forward hooks during the usual forward passes (the teachers
            still run once per step) and ``hints.weight · hint`` is added to the loss, weighted
            per sample by the fusion weights (or, with ``hints.confidence_heads``, CA-MKD's
            confidence through each teacher's head); logged as ``{stage}/hint``. Its adapters are
            created in ``setup("fit")`` from one batch of ``trainer.datamodule`` (or earlier by
            :meth:`materialize_hints`), so they are optimised and checkpointed (under ``hints.``).
        shard_teachers: under data-parallel training with ``W`` ranks, each rank keeps only every
            ``W``-th teacher and runs it on the global batch; the ranks exchange logits
            (:class:`~kd_lightning.teachers.sharded.ShardedTeachers`), so teacher memory per rank
            falls by about ``W``. Applied in ``setup``, before the teachers move to the device;
            a no-op on one process. Needs live teachers, at least ``W`` of them, and every
            teacher each step (no hints, no per-step teacher selection, no ``save_teachers``).
            The sharded module then runs only in a group of the same size.

    Example:
        >>> module = DistillationModule(nn.Linear(4, 3), {"a": nn.Linear(4, 3), "b": nn.Linear(4, 3)})
        >>> module(torch.randn(2, 4)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        student: nn.Module,
        teachers: TeacherEnsemble | CachedTeachers | Mapping[str, nn.Module],
        loss: DistillationLoss | None = None,
        optimizer: OptimizerFactory = torch.optim.Adam,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
        batch_adapter: Callable[[Any], tuple[Any, Tensor]] | None = None,
        save_teachers: bool = False,
        hints: FeatureHintLoss | None = None,
        shard_teachers: bool = False,
    ) -> None:
        super().__init__(("loss", "ce", "kd", "acc") + (("hint",) if hints is not None else ()))
        self.save_hyperparameters(
            ignore=[
                "student",
                "teachers",
                "loss",
                "optimizer",
                "scheduler",
                "batch_adapter",
                "hints",
            ]
        )
        self.student = student
        self.teachers: TeacherEnsemble | CachedTeachers | ShardedTeachers = (
            teachers
            if isinstance(teachers, TeacherEnsemble | CachedTeachers)
            else TeacherEnsemble(teachers)
        )
        self.loss = loss if loss is not None else DistillationLoss()
        self.loss.fusion.bind_student(self.student)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.batch_adapter = batch_adapter if batch_adapter is not None else BatchAdapter()
        self.hints = hints
        if hints is not None:
            if not isinstance(self.teachers, TeacherEnsemble):
                raise ValueError("feature hints tap the teachers' layers: they need live teachers")
            self._check_hints_runtime()
            self._teacher_layers = hints.layers_for(self.teachers.names)
            FeatureTaps(self.student, [hints.student_layer]).remove()  # names checked early
            for name, layer in self._teacher_layers.items():
                FeatureTaps(self.teachers.teachers[name], [layer]).remove()
            self._hint_heads = hints.heads_for(dict(self.teachers.teachers.items()))
        if shard_teachers:
            self._check_shardable()

    @property
    def teacher_names(self) -> list[str]:
        """The teachers' names, in the order of ``teacher_logits``."""
        return list(self.teachers.names)

    def forward(self, inputs: Any) -> Tensor:
        """The student's logits."""
        return self.student(inputs)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self._step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs, _ = self.batch_adapter(batch)
        return self.student(inputs)

    def setup(self, stage: str) -> None:
        if stage == "fit" and self._needs_dry_run():
            datamodule = getattr(self.trainer, "datamodule", None)
            if datamodule is None:
                raise RuntimeError(
                    "DistillationModule must create its hint adapters or lazy loss parameters "
                    "before the optimizer is built: fit with a datamodule, or call "
                    "module.materialize_hints(batch) on one training batch first"
                )
            self.materialize_hints(next(iter(datamodule.train_dataloader())))
        if self.hparams["shard_teachers"]:
            self._shard_teachers()

    def _shard_teachers(self) -> None:
        """Keep this rank's teachers only, before Lightning moves the module and wraps it in DDP."""
        world_size = self.trainer.world_size
        if world_size == 1 or isinstance(self.teachers, ShardedTeachers):
            return
        assert isinstance(self.teachers, TeacherEnsemble)
        self.teachers = ShardedTeachers(self.teachers, self.trainer.global_rank, world_size)
        # Ranks hold different teachers: DDP must neither compare nor broadcast them.
        self._ddp_params_and_buffers_to_ignore = [
            f"teachers.{name}"
            for name, _ in (*self.teachers.named_parameters(), *self.teachers.named_buffers())
        ]

    def materialize_hints(self, batch: Any) -> None:
        """Create the hint adapters (and any lazy fusion parameters) with one dry run on ``batch``.

        Runs the student, the teachers and the loss once under ``no_grad``; a no-op when nothing is
        left to create.
        """
        if not self._needs_dry_run():
            return
        device = next(self.student.parameters()).device
        inputs, labels = self.batch_adapter(move_data_to_device(batch, device))
        with torch.no_grad(), self._taps() as taps:
            student_logits = self.student(inputs)
            teacher_logits = self._teacher_logits(inputs, batch, "train")
            self.loss(student_logits, teacher_logits, labels)
            if taps is not None and self.hints is not None:
                student_taps, teacher_taps = taps
                self.hints.materialize(
                    student_taps[self.hints.student_layer], self._teacher_features(teacher_taps)
                )

    def _needs_dry_run(self) -> bool:
        lazy = any(
            isinstance(p, nn.parameter.UninitializedParameter) for p in self.loss.parameters()
        )
        return lazy or (self.hints is not None and not self.hints.materialized)

    @contextlib.contextmanager
    def _taps(self):
        """Hooks on the hinted layers for one step: ``(student_taps, teacher_taps)`` or ``None``."""
        if self.hints is None:
            yield None
            return
        student_taps = FeatureTaps(self.student, [self.hints.student_layer])
        teacher_taps = {
            name: FeatureTaps(self.teachers.teachers[name], [layer])
            for name, layer in self._teacher_layers.items()
        }
        try:
            yield student_taps, teacher_taps
        finally:
            student_taps.remove()
            for taps in teacher_taps.values():
                taps.remove()

    def _teacher_features(self, teacher_taps: dict[str, FeatureTaps]) -> dict[str, Tensor]:
        features = {name: teacher_taps[name][layer] for name, layer in self._teacher_layers.items()}
        if isinstance(self.teachers, TeacherEnsemble) and self.teachers.inference_mode:
            # Read in inference mode: a clone is an ordinary tensor that backward may save.
            return {name: feature.clone() for name, feature in features.items()}
        return features

    def configure_optimizers(self) -> Any:
        hints = () if self.hints is None else tuple(self.hints.parameters())
        return configure_optimizers(
            (*self.student.parameters(), *self.loss.parameters(), *hints),
            self.optimizer_factory,
            self.scheduler_factory,
            total_steps=int(self.trainer.estimated_stepping_batches),
            interval=self.hparams["scheduler_interval"],
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not self.hparams["save_teachers"]:
            state = checkpoint["state_dict"]
            for key in [key for key in state if key.startswith("teachers.")]:
                del state[key]

    def _step(self, batch: Any, stage: Stage) -> dict[str, Tensor]:
        inputs, labels = self.batch_adapter(batch)
        with self._taps() as taps:
            student_logits = self.student(inputs)
            teacher_logits = self._teacher_logits(inputs, batch, stage)
        self._check_classes(student_logits, teacher_logits)
        out = self.loss(student_logits, teacher_logits, labels)
        total = out.loss
        hint: Tensor | None = None
        if taps is not None and self.hints is not None:
            student_taps, teacher_taps = taps
            hint = self.hints(
                student_taps[self.hints.student_layer],
                self._teacher_features(teacher_taps),
                out.weights,
                labels=labels,
                heads=self._hint_heads,
            )
            total = total + self.hints.weight * hint
        hits = student_logits.argmax(-1) == labels
        tokens: Tensor | float
        if out.real is None:
            tokens = float(labels.numel())
            accuracy = hits.sum() / max(tokens, 1.0)
        else:  # padded tokens count for nothing
            real_tokens = out.real.sum()
            accuracy = (hits & out.real).sum() / real_tokens.clamp_min(1)
            tokens = real_tokens
        size = float(labels.shape[0])  # epoch means weigh batches by size, as Lightning's do
        values = [total, out.hard, out.soft, accuracy]
        weights: list[Tensor | float] = [size, size, size, tokens]
        if hint is not None:
            values.append(hint)
            weights.append(size)
        self.update_epoch_means(stage, values, weights)
        outputs = {
            "loss": total,
            "student_logits": student_logits.detach(),
            "teacher_logits": teacher_logits,
            "labels": labels,
            "fusion_weights": out.weights.detach(),
        }
        if labels.ndim > 1:  # sequence batches: which positions are real tokens
            outputs["mask"] = torch.ones_like(hits) if out.real is None else out.real
        if teacher_logits.shape[0] != len(self.teacher_names):  # one drawn teacher ran alone
            del outputs["teacher_logits"], outputs["fusion_weights"]
        return outputs

    def _teacher_logits(self, inputs: Any, batch: Any, stage: Stage) -> Tensor:
        """Run the teachers on ``inputs``, or read the cache at the batch's sample indices."""
        if isinstance(self.teachers, CachedTeachers):
            return self.teachers.logits(stage, sample_indices(batch)).to(self.device)
        only = self.loss.fusion.teachers_to_run(len(self.teachers)) if stage == "train" else None
        return self.teachers(inputs, only=only)

    def _check_hints_runtime(self) -> None:
        """Feature hints read every teacher's layers: refuse the fast paths that skip them."""
        assert isinstance(self.teachers, TeacherEnsemble)
        if self.teachers.stacked:
            raise ValueError(
                "feature hints read each teacher's layers, which a stacked (vmap) forward does not "
                "run: build the TeacherEnsemble with stacked=False"
            )
        fusion = self.loss.fusion
        if fusion.selects_teachers:
            raise ValueError(
                f"feature hints need every teacher's features, but {type(fusion).__name__} runs "
                "a subset of the teachers per step (e.g. RandomTeacher(run_drawn_only=True))"
            )

    def _check_shardable(self) -> None:
        """Sharding exchanges every teacher's logits each step: refuse what does not fit."""
        if not isinstance(self.teachers, TeacherEnsemble):
            raise ValueError("shard_teachers=True needs live teachers, not a teacher-output cache")
        conflicts = {
            "feature hints read the teachers' layers on every rank": self.hints is not None,
            "save_teachers=True would save only rank 0's teachers": self.hparams["save_teachers"],
            f"{type(self.loss.fusion).__name__} runs a subset of the teachers per step": (
                self.loss.fusion.selects_teachers
            ),
        }
        for reason, present in conflicts.items():
            if present:
                raise ValueError(f"shard_teachers=True cannot be combined with this: {reason}")

    def _check_classes(self, student_logits: Tensor, teacher_logits: Tensor) -> None:
        student_classes, teacher_classes = student_logits.shape[-1], teacher_logits.shape[-1]
        if student_classes != teacher_classes:
            raise ValueError(
                f"the student ({type(self.student).__name__}) outputs {student_classes} classes but the "
                f"teachers {self.teachers.names} output {teacher_classes}"
            )
