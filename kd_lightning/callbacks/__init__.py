"""Lightning callbacks (and the checkpoint writer) for multi-teacher distillation."""

from kd_lightning.callbacks.agreement import TeacherAgreementCallback, agreement_log_dict
from kd_lightning.callbacks.atomic_checkpoint_io import AtomicCheckpointIO
from kd_lightning.callbacks.heatmap import AgreementHeatmapCallback
from kd_lightning.callbacks.nonfinite import NonFiniteLossGuard
from kd_lightning.callbacks.progress import LabelledProgressBar
from kd_lightning.callbacks.random_state import RandomStateCheckpoint
from kd_lightning.callbacks.schedule import LossSchedule

__all__ = [
    "AgreementHeatmapCallback",
    "AtomicCheckpointIO",
    "LabelledProgressBar",
    "LossSchedule",
    "NonFiniteLossGuard",
    "RandomStateCheckpoint",
    "TeacherAgreementCallback",
    "agreement_log_dict",
]
