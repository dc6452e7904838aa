"""Average only the teachers that predict the label correctly."""

from __future__ import annotations

import torch
from torch import Tensor

from kd_lightning.fusion.base import FusionContext, FusionRule


class CorrectTeachersOnly(FusionRule, name="correct_only"):
    """Uniform weights over the teachers whose top-1 prediction equals the label.

    Per sample, a teacher gets weight ``1 / #correct`` if ``argmax z_k = y`` and 0 otherwise; when
    no teacher is right, all get ``1/K``. The weights sum to one. Needs labels.

    Examples:
        >>> z = torch.tensor([[[2.0, 0.0], [2.0, 0.0]], [[0.0, 2.0], [2.0, 0.0]]])
        >>> CorrectTeachersOnly()(z, torch.tensor([1, 0])).weights.tolist()
        [[0.0, 1.0], [0.5, 0.5]]
    """

    needs_labels = True

    def weights(self, teacher_logits: Tensor, context: FusionContext) -> Tensor:
        """Uniform weights over the correct teachers ``(*batch, K)``; see the class docstring."""
        labels = context.labels
        assert labels is not None  # FusionRule.forward enforces needs_labels
        correct = (teacher_logits.argmax(dim=-1) == labels).movedim(0, -1).float()
        any_correct = correct.sum(dim=-1, keepdim=True) > 0
        chosen = torch.where(any_correct, correct, 1.0)
        return chosen / chosen.sum(dim=-1, keepdim=True)
