"""Build the LightningModule of the configured ``method`` from the student and the teachers."""

from __future__ import annotations

from collections.abc import Callable

from hydra.utils import instantiate
from lightning.pytorch import LightningModule
from omegaconf import DictConfig
from torch import nn

from kd_lightning.modules import DistillationModule
from kd_lightning.teachers import TeacherEnsemble

MethodBuilder = Callable[[DictConfig, nn.Module, TeacherEnsemble], LightningModule]


def build_ensemble(
    cfg: DictConfig, student: nn.Module, teachers: TeacherEnsemble
) -> LightningModule:
    """``method=ensemble``: :class:`DistillationModule` with the configured fusion and loss, plus
    feature hints when ``method.hints`` is set (``method=ensemble_hints``)."""
    loss = instantiate(cfg.method.loss, fusion=instantiate(cfg.fusion))
    hints_cfg = cfg.method.get("hints")
    return DistillationModule(
        student,
        teachers,
        loss,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        hints=instantiate(hints_cfg, _convert_="all") if hints_cfg else None,
    )


METHODS: dict[str, MethodBuilder] = {
    "ensemble": build_ensemble,
    "ensemble_hints": build_ensemble,  # the same builder; its config sets method.hints
}


def build_method(cfg: DictConfig, student: nn.Module, teachers: TeacherEnsemble) -> LightningModule:
    """The module for ``cfg.method.name``."""
    name = cfg.method.name
    if name not in METHODS:
        raise ValueError(
            f"method.name={name!r} is not a known method; choose one of {sorted(METHODS)}"
        )
    return METHODS[name](cfg, student, teachers)
