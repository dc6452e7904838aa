"""Confidence-aware weighting (CA-MKD): teachers with a low loss on the true label count more."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.fusion.base import FusionContext, FusionRule


class ConfidenceAware(FusionRule, name="confidence"):
    """Per-sample weights from each teacher's cross-entropy against the label.

    Zhang, Chen, Wang, "Confidence-Aware Multi-Teacher Knowledge Distillation" (CA-MKD),
    ICASSP 2022. With ``CE_k`` the cross-entropy of ``z_k`` (temperature 1) against the label,
    ``w_k = (1 - softmax_k(CE_k)) / (K - 1)``; the weights sum to one. With ``K = 1`` the weight
    is 1. We follow the paper: the reference code (Rorozhl/CA-MKD) divides once more by ``K``,
    which only rescales the distillation term by ``1/K``. Needs labels.

    Examples:
        >>> import math
        >>> z = torch.tensor([[[0.0, 0.0]], [[math.log(3.0), 0.0]]])
        >>> # CE = (log 2, log 4/3); softmax(CE) = (2, 4/3) / (10/3) = (0.6, 0.4)
        >>> [round(w, 4) for w in ConfidenceAware()(z, torch.tensor([0])).weights[0].tolist()]
        [0.4, 0.6]
    """

    needs_labels = True

    def weights(self, teacher_logits: Tensor, context: FusionContext) -> Tensor:
        """Confidence weights ``(*batch, K)``; see the class docstring."""
        labels = context.labels
        assert labels is not None  # FusionRule.forward enforces needs_labels
        log_probs = F.log_softmax(teacher_logits, dim=-1)
        label_index = labels.expand(teacher_logits.shape[:-1]).unsqueeze(-1)
        cross_entropies = -log_probs.gather(-1, label_index).squeeze(-1).movedim(0, -1)
        return self.from_cross_entropies(cross_entropies)

    def from_cross_entropies(self, cross_entropies: Tensor) -> Tensor:
        """The weights ``(*batch, K)`` of teachers whose cross-entropies against the label at
        temperature 1 are ``cross_entropies`` ``(*batch, K)`` (a sparse KD loss computes them
        from top-k outputs).

        Examples:
            >>> ConfidenceAware().from_cross_entropies(torch.tensor([[0.0, 0.0]]))
            tensor([[0.5000, 0.5000]])
        """
        num_teachers = cross_entropies.shape[-1]
        if num_teachers == 1:
            return torch.ones_like(cross_entropies)
        return (1 - F.softmax(cross_entropies, dim=-1)) / (num_teachers - 1)
