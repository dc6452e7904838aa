"""Pure-torch functional core: divergences between distributions and agreement statistics.

Example:
    >>> import torch
    >>> from kd_lightning.functional import kd_loss
    >>> s = torch.zeros(2, 3)
    >>> round(kd_loss(s, s).item(), 4)
    0.0
"""

from __future__ import annotations

from kd_lightning.functional.agreement import (
    disagreement,
    ensemble_jsd,
    pairwise_agreement,
    per_teacher_accuracy,
    student_teacher_agreement,
    top1_agreement,
)
from kd_lightning.functional.divergences import (
    js_divergence,
    kd_loss,
    kl_divergence,
    logit_mse,
    reverse_kl_divergence,
    soft_cross_entropy,
)

__all__ = [
    "disagreement",
    "ensemble_jsd",
    "js_divergence",
    "kd_loss",
    "kl_divergence",
    "logit_mse",
    "pairwise_agreement",
    "per_teacher_accuracy",
    "reverse_kl_divergence",
    "soft_cross_entropy",
    "student_teacher_agreement",
    "top1_agreement",
]
