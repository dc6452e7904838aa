"""torchmetrics metrics for multi-teacher distillation."""

from kd_lightning.metrics.agreement import TeacherAgreement, with_teacher_dims

__all__ = ["TeacherAgreement", "with_teacher_dims"]
