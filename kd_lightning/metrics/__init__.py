"""torchmetrics metrics for multi-teacher distillation."""

from kd_lightning.metrics.agreement import TeacherAgreement

__all__ = ["TeacherAgreement"]
