"""Pure-torch functional core: divergences between distributions and agreement statistics.

Examples:
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
from kd_lightning.functional.online import (
    attention_targets,
    codistillation_loss,
    cyclic_kd_losses,
    dml_losses,
    dml_peer_loss,
    ffl_loss,
    lsgan_discriminator_loss,
    lsgan_generator_loss,
    okddip_loss,
    pool_features,
)
from kd_lightning.functional.regimes import (
    prokt_student_loss,
    prokt_teacher_loss,
    tfkd_virtual_loss,
    virtual_teacher_logits,
    virtual_teacher_probs,
)
from kd_lightning.functional.targets import probability_shift

__all__ = [
    "attention_targets",
    "codistillation_loss",
    "cyclic_kd_losses",
    "disagreement",
    "dml_losses",
    "dml_peer_loss",
    "ensemble_jsd",
    "ffl_loss",
    "js_divergence",
    "kd_loss",
    "kl_divergence",
    "logit_mse",
    "lsgan_discriminator_loss",
    "lsgan_generator_loss",
    "okddip_loss",
    "pairwise_agreement",
    "per_teacher_accuracy",
    "pool_features",
    "probability_shift",
    "prokt_student_loss",
    "prokt_teacher_loss",
    "reverse_kl_divergence",
    "soft_cross_entropy",
    "student_teacher_agreement",
    "tfkd_virtual_loss",
    "top1_agreement",
    "virtual_teacher_logits",
    "virtual_teacher_probs",
]
