"""The teacher-assistant chain of ``method=takd``: each hop an ordinary distillation run."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn

from kd_lightning.fusion import FusionRule
from kd_lightning.losses.distillation import DistillationLoss
from kd_lightning.modules.distillation import DistillationModule
from kd_lightning.modules.optim import OptimizerFactory, SchedulerFactory
from kd_lightning.modules.stages import NetworkSpec, StageRunner, build_network
from kd_lightning.teachers import TeacherEnsemble, TeacherSource

# The fusion of a hop from one network: any rule over one teacher is plain Hinton KD.
SINGLE_TEACHER_FUSION = "mean_probs"


def takd_pipeline(
    student: nn.Module,
    teachers: TeacherSource,
    stages: StageRunner,
    assistants: Sequence[NetworkSpec],
    loss: Callable[..., DistillationLoss] = DistillationLoss,
    fusion: FusionRule | str = "mean_probs",
    stage_epochs: int = 1,
    optimizer: OptimizerFactory = torch.optim.Adam,
    scheduler: SchedulerFactory | None = None,
) -> DistillationModule:
    """``method=takd`` (Mirzadeh et al., "Improved Knowledge Distillation via Teacher Assistant",
    AAAI 2020): teachers → ``assistants`` in order → student.

    Every hop is ordinary KD, ``(1 − λ)·CE + λ·τ²·KL``, from the frozen predecessor: the first
    assistant learns from the whole ensemble through ``loss(fusion=fusion)``, each later network
    from the one before it through ``loss(fusion="mean_probs")`` (one teacher: plain Hinton KD).
    The assistant hops run here as stages ``takd-assistant<i>`` of ``stage_epochs`` epochs, each
    assistant built after seeding with the run's seed + i; the returned module is the last hop,
    assistant → student, which the caller fits.

    Takes ``teachers`` (the configured frozen teachers as any
    :class:`~kd_lightning.teachers.TeacherSource`, e.g. their teacher-output cache, which only the
    first hop reads) and ``stages``.

    Args:
        student: the network distilled by the last hop.
        teachers: what teaches the first assistant.
        stages: runs the assistant hops.
        assistants: the teacher assistants, largest first: networks or factories of them.
        loss: builds each hop's objective from a fusion rule (e.g. a partial of
            :class:`~kd_lightning.DistillationLoss` fixing α, τ and the divergence).
        fusion: the fusion rule of the first hop.
        stage_epochs: epochs of each assistant hop.
        optimizer, scheduler: of every hop.

    Examples:
        >>> takd_pipeline(nn.Linear(4, 3), TeacherEnsemble({"t": nn.Linear(4, 3)}), None, [])
        Traceback (most recent call last):
        ...
        ValueError: assistants is empty: list the teacher assistants (networks or model configs), largest first
    """
    if not assistants:
        raise ValueError(
            "assistants is empty: list the teacher assistants (networks or model configs), "
            "largest first"
        )
    predecessor: TeacherSource = teachers
    hop_loss = loss(fusion=fusion)
    for index, spec in enumerate(assistants, start=1):
        name = f"assistant{index}"
        assistant = build_network(spec, stages.seed + index)
        make_hop = partial(
            DistillationModule,
            assistant,
            predecessor,
            hop_loss,
            optimizer=optimizer,
            scheduler=scheduler,
        )
        stages.run(f"takd-{name}", assistant, make_hop, stage_epochs)
        predecessor = TeacherEnsemble({name: assistant})
        hop_loss = loss(fusion=SINGLE_TEACHER_FUSION)
    return DistillationModule(
        student, predecessor, hop_loss, optimizer=optimizer, scheduler=scheduler
    )
