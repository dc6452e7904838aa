"""Lightning callbacks for multi-teacher distillation."""

from kd_lightning.callbacks.agreement import TeacherAgreementCallback, agreement_log_dict

__all__ = ["TeacherAgreementCallback", "agreement_log_dict"]
