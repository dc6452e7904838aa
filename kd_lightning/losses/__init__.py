"""Losses: the multi-teacher distillation objective, feature hints and loss-weight schedules."""

from kd_lightning.losses.distillation import DistillationLoss, DistillationOutput
from kd_lightning.losses.hints import FeatureHintLoss

__all__ = ["DistillationLoss", "DistillationOutput", "FeatureHintLoss"]
