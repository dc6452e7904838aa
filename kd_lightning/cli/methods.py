"""Build the LightningModule of the configured ``method`` from the student and the teachers.

Each ``method=`` value is a :class:`Method`: a builder called with a :class:`MethodContext`, and
whether the method needs the configured (frozen, pretrained) teachers at all. Online methods train
peers instead; multi-stage methods run their earlier stages inside the builder and keep each
stage's checkpoint under ``context.stage_dir``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hydra.utils import instantiate
from lightning.pytorch import LightningDataModule, LightningModule
from omegaconf import DictConfig
from torch import nn

from kd_lightning.cli.online_methods import (
    build_afd,
    build_codistillation,
    build_dml,
    build_ffl,
    build_okddip,
)
from kd_lightning.cli.staged_methods import (
    build_prokd,
    build_prokt,
    build_takd,
    build_tfkd,
    tfkd_trained_model,
)
from kd_lightning.modules import DistillationModule
from kd_lightning.teachers import TeacherEnsemble
from kd_lightning.teachers.cache.store import CachedTeachers


@dataclass
class MethodContext:
    """What a method builder gets: the config, the freshly built student, the teachers (``None``
    when the method does not need them; :class:`CachedTeachers` with ``cache=true``), the
    datamodule and a directory for stage checkpoints."""

    cfg: DictConfig
    student: nn.Module
    teachers: TeacherEnsemble | CachedTeachers | None
    datamodule: LightningDataModule
    stage_dir: Path


def student_model(cfg: DictConfig) -> DictConfig:
    """The model config of the network a method trains and reports: ``cfg.student``."""
    return cfg.student


@dataclass(frozen=True)
class Method:
    """One value of the ``method`` config group.

    ``reads_cache``: with ``cache=true`` its builder takes :class:`CachedTeachers` (teacher logits
    read by sample index) instead of live teachers. ``trained_model``: the model config of the
    network it trains and reports, which the scratch baseline (``baseline=true``) trains too.
    """

    build: Callable[[MethodContext], LightningModule]
    needs_teachers: bool = True
    reads_cache: bool = False
    trained_model: Callable[[DictConfig], DictConfig] = student_model


def build_ensemble(context: MethodContext) -> LightningModule:
    """``method=ensemble``: :class:`DistillationModule` with the configured fusion and loss, plus
    feature hints when ``method.hints`` is set (``method=ensemble_hints``)."""
    cfg = context.cfg
    assert context.teachers is not None
    loss = instantiate(cfg.method.loss, fusion=instantiate(cfg.fusion))
    hints_cfg = cfg.method.get("hints")
    return DistillationModule(
        context.student,
        context.teachers,
        loss,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        hints=instantiate(hints_cfg, _convert_="all") if hints_cfg else None,
        shard_teachers=bool(cfg.get("teacher_runtime", {}).get("shard_across_ranks", False)),
    )


METHODS: dict[str, Method] = {
    "ensemble": Method(build_ensemble, reads_cache=True),
    "ensemble_hints": Method(build_ensemble),  # the same builder; its config sets method.hints
    "takd": Method(build_takd),
    "prokt": Method(build_prokt, needs_teachers=False),  # builds its own first teacher
    "prokd": Method(build_prokd, needs_teachers=False),
    "tfkd": Method(build_tfkd, needs_teachers=False, trained_model=tfkd_trained_model),
    # online methods: peers train together, no pretrained teacher
    "dml": Method(build_dml, needs_teachers=False),
    "codistillation": Method(build_codistillation, needs_teachers=False),
    "okddip": Method(build_okddip, needs_teachers=False),
    "ffl": Method(build_ffl, needs_teachers=False),
    "afd": Method(build_afd, needs_teachers=False),
}


def method_for(cfg: DictConfig) -> Method:
    """The :class:`Method` named by ``cfg.method.name``."""
    name = cfg.method.name
    if name not in METHODS:
        raise ValueError(
            f"method.name={name!r} is not a known method; choose one of {sorted(METHODS)}"
        )
    return METHODS[name]


def build_method(context: MethodContext) -> LightningModule:
    """The module for ``context.cfg.method.name``."""
    return method_for(context.cfg).build(context)
