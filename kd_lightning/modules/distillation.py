"""Distil a student from a frozen ensemble of teachers with Lightning."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn
from torch.profiler import record_function

from kd_lightning.losses.distillation import DistillationLoss, DistillationOutput
from kd_lightning.losses.hints import FeatureHintLoss
from kd_lightning.models.taps import FeatureTaps
from kd_lightning.modules.base import MethodModule
from kd_lightning.modules.epoch_means import Stage
from kd_lightning.modules.optim import (
    JointOptimizer,
    JointSchedule,
    OptimizerFactory,
    SchedulerFactory,
)
from kd_lightning.teachers import TeacherEnsemble, TeacherOutputs, TeacherSource


class DistillationModule(MethodModule):
    """Train ``student`` against frozen ``teachers`` with a :class:`~kd_lightning.DistillationLoss`.

    Each train/val/test step asks the teacher source once for the logits of the teachers that run
    in it (:meth:`~kd_lightning.teachers.TeacherSource.outputs`) and returns the detached student
    logits, those teacher logits (``teacher_logits``, ``(K', *batch, C)``), their indices into
    :attr:`teacher_names` (``teacher_indices``, ``(K',)``), the labels and the fusion weights
    (``fusion_weights``, ``(*batch, K')``), so callbacks (e.g.
    :class:`~kd_lightning.callbacks.TeacherAgreementCallback`) never run a teacher again. ``K' = K``
    unless the source runs a subset (:class:`~kd_lightning.teachers.DrawnTeachers` in training).
    A source of top-k outputs (a :class:`~kd_lightning.teachers.SequenceCachedTeachers` with
    ``sparse=True``) gives ``teacher_topk`` instead of ``teacher_logits``: the
    :class:`~kd_lightning.teachers.cache.topk.TopKLogits` (values and ids ``(K', *batch, k)``,
    tail ``(K', *batch)``), so that no step builds the dense ``(K', *batch, C)``.
    Logged: ``{stage}/loss``, ``{stage}/ce``, ``{stage}/kd`` and ``{stage}/acc``.

    Token-level outputs work too: logits ``(B, L, V)`` with labels ``(B, L)`` whose padded
    positions hold the loss's ``ignore_index``; accuracy then counts real tokens only, and the
    step also returns ``"mask"`` ``(B, L)``, true at real tokens.

    The student layers that the loss's fusion rule reads (``loss.student_layers``, e.g. a learned
    gate's) are tapped with :class:`~kd_lightning.models.taps.FeatureTaps` during the student's
    forward pass and passed to the loss as ``student_features``; the fields of dict batches it
    names (``loss.batch_fields``, e.g. a routed rule's teacher id) are passed as ``batch_fields``.

    Only the student and the loss's learnable parameters (e.g. learnable fusion weights) are
    optimised. Checkpoints hold no teacher weights unless ``save_teachers=True``; loading a
    student-only checkpoint leaves the teachers as they are.

    Args:
        student: the network being trained.
        teachers: any :class:`~kd_lightning.teachers.TeacherSource` — a
            :class:`~kd_lightning.teachers.TeacherEnsemble`, a
            :class:`~kd_lightning.teachers.DrawnTeachers`, or a
            :class:`~kd_lightning.teachers.CachedTeachers` (logits read by the sample indices the
            batches carry, from :class:`~kd_lightning.data.indexed.IndexedDataModule`) — or a
            ``name → model`` mapping, run as a ``TeacherEnsemble``.
        loss: the objective; defaults to ``DistillationLoss()`` (mean of probabilities, α = 0.9, T = 4).
        optimizer: called with the trainable parameters, e.g. ``functools.partial(torch.optim.Adam, lr=1e-2)``.
        scheduler: called with the optimizer (and ``total_steps=trainer.estimated_stepping_batches``
            when it takes a ``total_steps`` argument); ``None`` for a constant learning rate.
        scheduler_interval: ``"step"`` or ``"epoch"``.
        batch_adapter: turns a batch into ``(inputs, labels)``; defaults to :class:`~kd_lightning.BatchAdapter`.
        save_teachers: keep teacher weights in checkpoints.
        hints: a :class:`~kd_lightning.losses.hints.FeatureHintLoss`: the student's and teachers' named
            layers are tapped by forward hooks during the usual forward passes (the teachers
            still run once per step; the source must be able to tap them) and
            ``hints.weight · hint`` is added to the loss, weighted per sample by the fusion weights
            (or, with ``hints.confidence_heads``, CA-MKD's confidence through each teacher's head);
            logged as ``{stage}/hint``. Its adapters are created in ``setup("fit")`` from one batch
            of ``trainer.datamodule`` (or earlier by :meth:`materialize`), so they are optimised
            and checkpointed (under ``hints.``).
        shard_teachers: under data-parallel training with ``W`` ranks, each rank keeps only every
            ``W``-th teacher and runs it on the global batch; the ranks exchange logits
            (:meth:`~kd_lightning.teachers.TeacherSource.shard`,
            :class:`~kd_lightning.teachers.sharded.ShardedTeachers`), so teacher memory per rank
            falls by about ``W``. Applied in ``setup``, before the teachers move to the device;
            a no-op on one process. The source must be able to shard (live teachers, at least
            ``W`` of them, every one at every step: no hints, no draws) and ``save_teachers`` be
            off. The sharded module then runs only in a group of the same size.

    Examples:
        >>> module = DistillationModule(nn.Linear(4, 3), {"a": nn.Linear(4, 3), "b": nn.Linear(4, 3)})
        >>> module(torch.randn(2, 4)).shape
        torch.Size([2, 3])
        >>> step = module.validation_step((torch.randn(2, 4), torch.tensor([0, 2])), 0)
        >>> step["teacher_logits"].shape, step["teacher_indices"].tolist()
        (torch.Size([2, 2, 3]), [0, 1])
    """

    token_level = True

    def __init__(
        self,
        student: nn.Module,
        teachers: TeacherSource | Mapping[str, nn.Module],
        loss: DistillationLoss | None = None,
        optimizer: OptimizerFactory = torch.optim.Adam,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
        batch_adapter: Callable[[Any], tuple[Any, Tensor]] | None = None,
        save_teachers: bool = False,
        hints: FeatureHintLoss | None = None,
        shard_teachers: bool = False,
    ) -> None:
        super().__init__(
            ("loss", "ce", "kd", "acc") + (("hint",) if hints is not None else ()),
            optimizer,
            scheduler,
            scheduler_interval,
            batch_adapter,
        )
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
        self.teachers: TeacherSource = (
            teachers if isinstance(teachers, TeacherSource) else TeacherEnsemble(teachers)
        )
        self.loss = loss if loss is not None else DistillationLoss()
        self.hints = hints
        hinted = () if hints is None else (hints.student_layer,)
        self._student_layers = tuple(dict.fromkeys((*self.loss.student_layers, *hinted)))
        FeatureTaps(self.student, self._student_layers).remove()  # names checked early
        if hints is not None:
            self.teachers.tap(hints.layers_for(self.teachers.names))
            self._hint_heads = hints.heads_for(self.teachers.networks())
        if shard_teachers:
            if save_teachers:
                raise ValueError(
                    "shard_teachers=True cannot be combined with save_teachers=True: each rank "
                    "holds only its own teachers, so rank 0 would save only its share"
                )
            self.teachers.shard(0, 1)  # a no-op for sources that can shard; the others refuse

    @property
    def teacher_names(self) -> list[str]:
        """The teachers' names; ``teacher_indices`` of the step outputs index this list."""
        return list(self.teachers.names)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self._needs_dry_run():
            datamodule = getattr(self.trainer, "datamodule", None)
            if datamodule is None:
                raise RuntimeError(
                    "DistillationModule must create its hint adapters or lazy loss parameters "
                    "before the optimizer is built: fit with a datamodule, or call "
                    "module.materialize(batch) on one training batch first"
                )
            self.materialize(next(iter(datamodule.train_dataloader())))
        if self.hparams["shard_teachers"]:  # this rank's teachers only, before the device move
            self.teachers = self.teachers.shard(self.trainer.global_rank, self.trainer.world_size)
        # Frozen teachers: DDP must neither compare nor broadcast them (sharded ones differ by
        # rank; offloaded ones stay in host memory).
        self._ddp_params_and_buffers_to_ignore = [
            name
            for name, _ in itertools.chain(self.named_parameters(), self.named_buffers())
            if name.startswith("teachers.")
        ]

    def materialize(self, batch: Any) -> None:
        """Create what is built lazily from the first batch — the hint adapters, lazy fusion
        parameters such as a learned gate's — with one dry run on ``batch``.

        Runs the student, the teachers (as in a training step) and the loss once under
        ``no_grad``; a no-op when nothing is left to create.
        """
        if not self._needs_dry_run():
            return
        device = next(self.student.parameters()).device
        batch = move_data_to_device(batch, device)
        inputs, labels = self.batch_adapter(batch)
        with torch.no_grad():
            student_logits, student_features = self._run_student(inputs)
            teachers = self.teachers.outputs(inputs, batch, "train")
            self._loss(batch, labels, student_logits, student_features, teachers)
            if self.hints is not None:
                self.hints.materialize(
                    student_features[self.hints.student_layer], teachers.features
                )

    def _needs_dry_run(self) -> bool:
        lazy = any(
            isinstance(p, nn.parameter.UninitializedParameter) for p in self.loss.parameters()
        )
        return lazy or (self.hints is not None and not self.hints.materialized)

    def _run_student(self, inputs: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """The student's logits, and the outputs of the layers the loss and the hints read."""
        with FeatureTaps(self.student, self._student_layers) as taps:
            logits = self.student(inputs)
        return logits, taps.features

    def _loss(
        self,
        batch: Any,
        labels: Tensor,
        student_logits: Tensor,
        student_features: Mapping[str, Tensor],
        teachers: TeacherOutputs,
    ) -> DistillationOutput:
        """The loss on this step's outputs, with what its fusion rule reads: the tapped student
        layers, the batch fields it names and which teachers ran."""
        fields = self.loss.batch_fields
        if fields and not isinstance(batch, Mapping):
            raise ValueError(
                f"{type(self.loss.fusion).__name__} reads the batch fields {list(fields)}: "
                f"batches must be mappings holding them, got {type(batch).__name__}"
            )
        missing = [field for field in fields if field not in batch]
        if missing:
            raise ValueError(
                f"{type(self.loss.fusion).__name__} reads the batch fields {missing}, which the "
                f"batch lacks (it holds {sorted(batch)})"
            )
        # Top-k teachers (a sequence cache's) go to a loss that computes from them unexpanded.
        topk = getattr(teachers, "topk", None)
        return self.loss(
            student_logits,
            topk if topk is not None and self.loss.accepts_topk else teachers.logits,
            labels,
            student_features={layer: student_features[layer] for layer in self.loss.student_layers},
            teacher_indices=teachers.ran,
            batch_fields={field: batch[field] for field in fields},
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not self.hparams["save_teachers"]:
            state = checkpoint["state_dict"]
            for key in [key for key in state if key.startswith("teachers.")]:
                del state[key]

    def step(self, batch: Any, stage: Stage) -> dict[str, Any]:
        inputs, labels = self.batch_adapter(batch)
        # Named ranges for torch.profiler (`kd-bench --profile`); free when nothing profiles.
        with record_function("kd/student_forward"):
            student_logits, student_features = self._run_student(inputs)
        with record_function("kd/teachers"):
            teachers = self.teachers.outputs(inputs, batch, stage)
        # Top-k teachers stay unexpanded unless a dense loss reads their logits.
        topk = getattr(teachers, "topk", None)
        self._check_classes(
            student_logits, teachers.logits.shape[-1] if topk is None else topk.num_classes
        )
        with record_function("kd/loss"):
            out = self._loss(batch, labels, student_logits, student_features, teachers)
        total = out.loss
        hint: Tensor | None = None
        if self.hints is not None:
            hint = self.hints(
                student_features[self.hints.student_layer],
                teachers.features,
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
        if topk is None:
            teacher, device = {"teacher_logits": teachers.logits}, teachers.logits.device
        else:
            teacher, device = {"teacher_topk": topk}, topk.values.device
        outputs = {
            "loss": total,
            "student_logits": student_logits.detach(),
            **teacher,
            "teacher_indices": torch.tensor(teachers.ran, device=device),
            "labels": labels,
            "fusion_weights": out.weights.detach(),
        }
        if labels.ndim > 1:  # sequence batches: which positions are real tokens
            outputs["mask"] = torch.ones_like(hits) if out.real is None else out.real
        return outputs

    def configure_optimizers(self) -> Any:
        """The student's optimizer and schedule over every trainable parameter; a fusion rule
        that declares its own optimizer (:attr:`~kd_lightning.fusion.FusionRule.own_optimizer`,
        e.g. AMTML-KD's gate) gets it for its parameters, stepped with the student's as one
        :class:`~kd_lightning.modules.optim.JointOptimizer`, its rate set each epoch by
        :meth:`on_train_epoch_start`; the student's schedule leaves it alone."""
        plan = self.loss.fusion.own_optimizer
        own = [p for p in self.loss.fusion.parameters() if p.requires_grad]
        if plan is None or not own:
            return super().configure_optimizers()
        held = {id(p) for p in own}
        config = self.optimizer_config(p for p in self.parameters() if id(p) not in held)
        joint = JointOptimizer([config["optimizer"], plan.build(own)])
        if "lr_scheduler" not in config:
            return {"optimizer": joint}
        schedule = JointSchedule(joint, config["lr_scheduler"]["scheduler"])
        return {
            "optimizer": joint,
            "lr_scheduler": {**config["lr_scheduler"], "scheduler": schedule},
        }

    def on_train_epoch_start(self) -> None:
        """Set the learning rate of the fusion rule's own optimizer for this epoch (divided at
        its milestones, 0 once its training window is over)."""
        super().on_train_epoch_start()
        plan = self.loss.fusion.own_optimizer
        if plan is None:
            return
        for optimizer in self.trainer.optimizers:
            if isinstance(optimizer, JointOptimizer):  # built by configure_optimizers, rule's last
                plan.start_epoch(optimizer.optimizers[-1], self.current_epoch)

    def _check_classes(self, student_logits: Tensor, teacher_classes: int) -> None:
        student_classes = student_logits.shape[-1]
        if student_classes == teacher_classes:
            return
        student = type(self.student).__name__
        if student_logits.ndim < 3:
            raise ValueError(
                f"the student ({student}) outputs {student_classes} classes but the "
                f"teachers {self.teachers.names} output {teacher_classes}"
            )
        try:  # name the teachers whose vocabulary differs, when the source has networks
            sizes = {
                name: getattr(network, "vocab_size", None)
                for name, network in self.teachers.networks().items()
            }
        except ValueError:
            sizes = {}
        culprits = [name for name, size in sizes.items() if size == teacher_classes]
        names = culprits or self.teachers.names
        who = f"teacher '{names[0]}' has" if len(names) == 1 else f"teachers {names} have"
        raise ValueError(
            f"{who} a vocabulary of {teacher_classes} tokens but the student ({student}) has "
            f"{student_classes}: cross-tokenizer distillation is not supported yet; give teachers "
            f"and student one tokenizer and vocabulary size"
        )
