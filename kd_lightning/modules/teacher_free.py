"""Teacher-free KD (Tf-KD): the virtual teacher's module, and the pipeline of ``method=tfkd``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from kd_lightning.functional import tfkd_virtual_loss, virtual_teacher_logits
from kd_lightning.losses.distillation import DistillationLoss
from kd_lightning.modules.base import MethodModule
from kd_lightning.modules.classifier import ClassifierModule
from kd_lightning.modules.distillation import DistillationModule
from kd_lightning.modules.epoch_means import Stage
from kd_lightning.modules.optim import OptimizerFactory, SchedulerFactory
from kd_lightning.modules.stages import NetworkSpec, StageRunner, build_network

VIRTUAL_TEACHER = "virtual"
TFKD_VARIANTS = ("virtual", "self", "reverse")


class VirtualTeacherModule(MethodModule):
    """Tf-KD with the virtual teacher (Yuan et al., "Revisiting Knowledge Distillation via Label
    Smoothing Regularization", CVPR 2020, "Tf-KD_reg").

    No network teaches: the target is ``p_d(k) = a`` for the true class and ``(1 − a)/(C − 1)``
    otherwise, softened as ``softmax(log p_d / T)``, and the student minimises the paper's
    ``(1 − α)·CE(y, q) + α·T²·KL(p_d^τ ‖ q^τ)`` (:func:`~kd_lightning.functional.tfkd_virtual_loss`).
    This follows the paper rather than its code, which softens by a softmax over probabilities,
    drops T², averages the KL over classes and multiplies the term by 50 to 100.

    For the agreement callback and the summary, the virtual teacher is reported as one teacher
    named ``"virtual"`` whose logits are ``log p_d`` (log-probabilities): it always predicts the
    label, so its accuracy is 1 and the student's agreement with it is the student's accuracy.
    Logged as epoch means: ``{stage}/loss``, ``{stage}/ce`` (the hard-label cross-entropy) and
    ``{stage}/acc``.

    Args:
        student: the network being trained.
        num_classes: C.
        correct_prob: a, the virtual teacher's probability of the true class.
        alpha: weight of the KD term.
        temperature: T; the KL term carries T².
        optimizer, scheduler, scheduler_interval, batch_adapter: as for
            :class:`~kd_lightning.modules.base.MethodModule`.

    Examples:
        >>> module = VirtualTeacherModule(nn.Linear(4, 3), num_classes=3)
        >>> module.teacher_names, module(torch.randn(2, 4)).shape
        (['virtual'], torch.Size([2, 3]))
    """

    def __init__(
        self,
        student: nn.Module,
        num_classes: int,
        correct_prob: float = 0.99,
        alpha: float = 0.5,
        temperature: float = 4.0,
        optimizer: OptimizerFactory = torch.optim.Adam,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
        batch_adapter: Callable[[Any], tuple[Any, Tensor]] | None = None,
    ) -> None:
        super().__init__(
            ("loss", "ce", "acc"), optimizer, scheduler, scheduler_interval, batch_adapter
        )
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        virtual_teacher_logits(torch.zeros(1, dtype=torch.long), num_classes, correct_prob)
        self.save_hyperparameters(ignore=["student", "optimizer", "scheduler", "batch_adapter"])
        self.student = student

    @property
    def teacher_names(self) -> list[str]:
        """``["virtual"]``."""
        return [VIRTUAL_TEACHER]

    def step(self, batch: Any, stage: Stage) -> dict[str, Tensor]:
        inputs, labels = self.batch_adapter(batch)
        student_logits = self.student(inputs)
        num_classes, correct_prob = self.hparams["num_classes"], self.hparams["correct_prob"]
        if student_logits.shape[-1] != num_classes:
            raise ValueError(
                f"the student outputs {student_logits.shape[-1]} classes but num_classes={num_classes}"
            )
        loss = tfkd_virtual_loss(
            student_logits,
            labels,
            self.hparams["alpha"],
            self.hparams["temperature"],
            correct_prob,
        )
        size = float(labels.shape[0])
        self.update_epoch_means(
            stage,
            [
                loss,
                F.cross_entropy(student_logits.detach().float(), labels),
                (student_logits.argmax(-1) == labels).float().mean(),
            ],
            [size, size, size],
        )
        teacher_logits = virtual_teacher_logits(labels, num_classes, correct_prob)
        return {
            "loss": loss,
            "student_logits": student_logits.detach(),
            "teacher_logits": teacher_logits.unsqueeze(0),
            "labels": labels,
        }


def tfkd_pipeline(
    student: nn.Module,
    stages: StageRunner,
    variant: Literal["virtual", "self", "reverse"] = "virtual",
    num_classes: int | None = None,
    correct_prob: float = 0.99,
    loss: DistillationLoss | None = None,
    student_copy: NetworkSpec | None = None,
    reverse_network: NetworkSpec | None = None,
    stage_epochs: int = 1,
    optimizer: OptimizerFactory = torch.optim.Adam,
    scheduler: SchedulerFactory | None = None,
) -> LightningModule:
    """``method=tfkd``: Tf-KD (Yuan et al., "Revisiting Knowledge Distillation via Label
    Smoothing Regularization", CVPR 2020), by ``variant``:

    * ``virtual``: :class:`VirtualTeacherModule`, no teacher network (``loss.alpha`` and
      ``loss.temperature`` weigh and soften its term);
    * ``self``: ``student_copy`` (the student's architecture) is trained from scratch on labels
      (stage ``tfkd-student``, ``stage_epochs``), then teaches the student, frozen, by ``loss``
      (reported as teacher ``self``);
    * ``reverse``: the same pretrained student-architecture network teaches a fresh
      ``reverse_network`` (``kd-train``: the first configured teacher's architecture), which is
      the network trained and reported (the teacher reported is ``pretrained_student``).

    Takes ``stages``, not ``teachers``: ``kd-train`` builds no pretrained teacher for it.

    Args:
        student: the network trained (``virtual``, ``self``).
        stages: runs the pretrained-student stage; its seed + 1 initialises that network, its seed
            the reverse network.
        variant: ``"virtual"``, ``"self"`` or ``"reverse"``.
        num_classes: C, for ``virtual``.
        correct_prob: a, the virtual teacher's probability of the true class.
        loss: the KD objective of ``self`` and ``reverse`` (one teacher); defaults to
            :class:`~kd_lightning.DistillationLoss`'s.
        student_copy: the pretrained student's network, or a factory of it (``self``, ``reverse``).
        reverse_network: the network ``reverse`` trains, or a factory of it.
        stage_epochs: epochs of the pretrained-student stage.
        optimizer, scheduler: of every network trained.

    Examples:
        >>> stages = StageRunner(None, "unused", {})  # virtual trains no stage
        >>> tfkd_pipeline(nn.Linear(4, 3), stages, num_classes=3).teacher_names
        ['virtual']
    """
    if variant not in TFKD_VARIANTS:
        raise ValueError(f"variant={variant!r} is not one of {list(TFKD_VARIANTS)}")
    loss = loss if loss is not None else DistillationLoss()
    if variant == "virtual":
        if num_classes is None:
            raise ValueError("num_classes is None: variant=virtual needs the class count C")
        return VirtualTeacherModule(
            student,
            num_classes=num_classes,
            correct_prob=correct_prob,
            alpha=loss.alpha,
            temperature=loss.temperature,
            optimizer=optimizer,
            scheduler=scheduler,
        )
    if student_copy is None:
        raise ValueError(f"student_copy is None: variant={variant} pretrains a student network")
    if variant == "reverse" and reverse_network is None:
        raise ValueError(
            "reverse_network is None: variant=reverse trains a plain network of the student's "
            "inputs and classes (kd-train: the first configured teacher's architecture, which "
            "must have no input_transform or class_map)"
        )
    pretrained = build_network(student_copy, stages.seed + 1)
    stages.run(
        "tfkd-student",
        pretrained,
        lambda: ClassifierModule(pretrained, optimizer=optimizer, scheduler=scheduler),
        stage_epochs,
    )
    if variant == "self":
        return DistillationModule(
            student, {"self": pretrained}, loss, optimizer=optimizer, scheduler=scheduler
        )
    assert reverse_network is not None
    trained = build_network(reverse_network, stages.seed)
    return DistillationModule(
        trained, {"pretrained_student": pretrained}, loss, optimizer=optimizer, scheduler=scheduler
    )
