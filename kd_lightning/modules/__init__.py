"""LightningModules for each distillation regime."""

from kd_lightning.modules.distillation import DistillationModule

__all__ = ["DistillationModule"]
