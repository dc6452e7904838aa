"""LightningModules for each training regime."""

from kd_lightning.modules.classifier import ClassifierModule
from kd_lightning.modules.distillation import DistillationModule

__all__ = ["ClassifierModule", "DistillationModule"]
