"""Lightning callbacks for multi-teacher distillation."""

from kd_lightning.callbacks.agreement import TeacherAgreementCallback, agreement_log_dict
from kd_lightning.callbacks.heatmap import AgreementHeatmapCallback

__all__ = ["AgreementHeatmapCallback", "TeacherAgreementCallback", "agreement_log_dict"]
