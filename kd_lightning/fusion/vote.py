"""Majority vote over the teachers' top-1 predictions: a hard target."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.fusion.base import FusionContext, FusionRule


class MajorityVote(FusionRule, name="vote"):
    """One-hot target on the class most teachers predict.

    The teachers' majority vote as a hard pseudo-label: a common multi-teacher baseline, not a
    published method of its own. (You, Xu, Xu & Tao, "Learning from Multiple Teacher Networks",
    KDD 2017, average the teachers' softened outputs, :class:`MeanProbabilities`; their "voting"
    ranks triplet dissimilarities of an intermediate layer and never trains on a voted label.)
    ``votes_c = Σ_k 1[argmax z_k = c]``; the winner is the class with most votes, ties broken by
    the teachers' mean probability ``(1/K) Σ_k softmax(z_k)`` so the result does not depend on
    the order of the teachers. The target is ``one_hot(winner)`` whatever the temperature, so with
    ``K = 1`` this rule gives the teacher's hard prediction, not Hinton KD. Weights are uniform over
    the teachers that voted for the winner and sum to one.

    Examples:
        >>> z = torch.tensor([[[2.0, 0.0, 0.0]], [[0.0, 2.0, 0.0]], [[3.0, 0.0, 0.0]]])
        >>> fusion = MajorityVote()(z)
        >>> fusion.target.tolist(), fusion.weights.tolist()
        ([[1.0, 0.0, 0.0]], [[0.5, 0.0, 0.5]])
    """

    def weights(self, teacher_logits: Tensor, context: FusionContext) -> Tensor:
        """Uniform weights over the teachers that voted for the winner ``(*batch, K)``."""
        voted_for_winner = teacher_logits.argmax(dim=-1) == self._winner(teacher_logits)
        voters = voted_for_winner.movedim(0, -1).float()
        return voters / voters.sum(dim=-1, keepdim=True)

    def target(self, teacher_logits: Tensor, weights: Tensor, temperature: float) -> Tensor:
        """``one_hot(winner)`` as float32 ``(*batch, C)``; the temperature is ignored."""
        num_classes = teacher_logits.shape[-1]
        return F.one_hot(self._winner(teacher_logits), num_classes).float()

    def agreement(self, teacher_logits: Tensor) -> Tensor:
        """Fraction of teachers that voted for the winning class, ``max_c votes_c / K``.

        Args:
            teacher_logits: Stacked teacher logits ``(K, *batch, C)``.

        Returns:
            Float32 ratios ``(*batch)`` in ``[1/K, 1]``.

        Examples:
            >>> z = torch.tensor([[[2.0, 0.0, 0.0]], [[0.0, 2.0, 0.0]], [[3.0, 0.0, 0.0]]])
            >>> [round(a, 4) for a in MajorityVote().agreement(z).tolist()]
            [0.6667]
        """
        return self._votes(teacher_logits).amax(dim=-1) / teacher_logits.shape[0]

    @staticmethod
    def _votes(teacher_logits: Tensor) -> Tensor:
        """Number of teachers predicting each class, float32 ``(*batch, C)``."""
        predictions = teacher_logits.argmax(dim=-1)
        return F.one_hot(predictions, teacher_logits.shape[-1]).sum(dim=0).float()

    def _winner(self, teacher_logits: Tensor) -> Tensor:
        """The most voted class ``(*batch)``, ties broken by the mean probability."""
        votes = self._votes(teacher_logits)
        mean_probs = F.softmax(teacher_logits.float(), dim=-1).mean(dim=0)
        is_top = votes == votes.amax(dim=-1, keepdim=True)
        return torch.where(is_top, mean_probs, -1.0).argmax(dim=-1)
