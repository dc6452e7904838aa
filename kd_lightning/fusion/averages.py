"""Unweighted averages of the teachers: of their probabilities or of their logits."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kd_lightning.fusion.base import FusionContext, FusionRule, uniform_weights


class MeanProbabilities(FusionRule, name="mean_probs"):
    """Arithmetic mean of the teachers' probabilities, ``p̄ = (1/K) Σ_k softmax(z_k / T)``.

    Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network" (2015): the ensemble's
    soft targets are the average of its members' predictive distributions. Weights are ``1/K``
    and sum to one.

    Examples:
        >>> import torch
        >>> z = torch.tensor([[[0.0, -1e4]], [[-1e4, 0.0]]])  # K = 2 opposite, confident teachers
        >>> MeanProbabilities()(z).target.tolist()
        [[0.5, 0.5]]
    """

    def weights(self, teacher_logits: Tensor, context: FusionContext) -> Tensor:
        """Weights ``1/K`` for every teacher; see :class:`FusionRule`."""
        return uniform_weights(teacher_logits)

    def target(self, teacher_logits: Tensor, weights: Tensor, temperature: float) -> Tensor:
        """``(1/K) Σ_k softmax(z_k / T)``: the weights are uniform, so a plain mean."""
        return F.softmax(teacher_logits / temperature, dim=-1).mean(dim=0)


class MeanLogits(FusionRule, name="mean_logits"):
    """Softmax of the mean logit, ``softmax((1/K) Σ_k z_k / T)``.

    As in TextBrewer's ``MultiTeacherDistiller``, which averages teacher logits before the
    softmax. This is the normalised geometric mean of the ``p_k`` (identity E2), a different
    target from :class:`MeanProbabilities`: a class that any one teacher rejects stays unlikely.
    Weights are ``1/K`` and sum to one.

    Examples:
        >>> import torch
        >>> z = torch.tensor([[[2.0, 0.0]], [[0.0, 0.0]]])
        >>> [round(p, 4) for p in MeanLogits()(z).target[0].tolist()]  # softmax([1, 0])
        [0.7311, 0.2689]
    """

    def weights(self, teacher_logits: Tensor, context: FusionContext) -> Tensor:
        """Weights ``1/K`` for every teacher; see :class:`FusionRule`."""
        return uniform_weights(teacher_logits)

    def target(self, teacher_logits: Tensor, weights: Tensor, temperature: float) -> Tensor:
        """``softmax(Σ_k ŵ_k z_k / T)`` with the normalised weights ``ŵ``."""
        normalised = weights / weights.sum(dim=-1, keepdim=True)
        mixed_logits = (normalised.movedim(-1, 0).unsqueeze(-1) * teacher_logits).sum(dim=0)
        return F.softmax(mixed_logits / temperature, dim=-1)
