"""Entropy-based weighting: confident (low-entropy) teachers count more, per sample."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.fusion.base import FusionContext, FusionRule


class EntropyWeighted(FusionRule, name="entropy"):
    """Per-sample weights that favour the teachers whose predictions have low entropy.

    Kwon et al., "Adaptive Knowledge Distillation Based on Entropy" (EBKD), ICASSP 2020.
    ``H_k`` is the entropy of ``softmax(z_k)`` at temperature 1, per sample.

    * ``tau=None`` (the paper's rule): ``w_k = 1 - H_k / Σ_j H_j``, which sums to ``K - 1``.
      With ``normalize=True`` (default) the weights are divided by ``K - 1`` so they sum to one
      and the distillation coefficient alpha keeps its meaning; ``normalize=False`` reproduces
      the scale of the paper and of the CA-MKD repository's EBKD baseline (helper/loops.py). If
      every teacher has zero entropy the weights are uniform at that scale; with ``K = 1`` the
      weight is 1.
    * ``tau`` given: ``w = softmax_k(-H_k / τ)``, which sums to one (``normalize`` must stay True).

    Args:
        tau: Temperature of the softmax variant, or None for the paper's rule.
        normalize: Divide the paper's weights by ``K - 1`` so they sum to one.

    Examples:
        >>> z = torch.tensor([[[0.0, 0.0, 0.0, 0.0]], [[0.0, 0.0, -1e4, -1e4]]])
        >>> # H = (log 4, log 2) = (2, 1)·log 2, so w = (1 - 2/3, 1 - 1/3)
        >>> [round(w, 4) for w in EntropyWeighted()(z).weights[0].tolist()]
        [0.3333, 0.6667]
    """

    def __init__(self, tau: float | None = None, normalize: bool = True) -> None:
        super().__init__()
        if tau is not None and not tau > 0:
            raise ValueError(f"EntropyWeighted: tau must be > 0 or None, got {tau}")
        if tau is not None and not normalize:
            raise ValueError(
                "EntropyWeighted: normalize=False only applies to the paper's rule (tau=None); "
                "the softmax variant always sums to one"
            )
        self.tau = tau
        self.normalize = normalize

    def weights(self, teacher_logits: Tensor, context: FusionContext) -> Tensor:
        """Entropy-based weights ``(*batch, K)``; see the class docstring."""
        entropies = torch.special.entr(F.softmax(teacher_logits, dim=-1)).sum(dim=-1)
        return self.from_entropies(entropies.movedim(0, -1))

    def from_entropies(self, entropies: Tensor) -> Tensor:
        """The weights ``(*batch, K)`` of teachers whose entropies at temperature 1 are
        ``entropies`` ``(*batch, K)`` (a sparse KD loss computes them from top-k outputs).

        Examples:
            >>> EntropyWeighted().from_entropies(torch.tensor([[2.0, 1.0]]))
            tensor([[0.3333, 0.6667]])
        """
        if self.tau is not None:
            return F.softmax(-entropies / self.tau, dim=-1)
        num_teachers = entropies.shape[-1]
        if num_teachers == 1:
            return torch.ones_like(entropies)
        total = entropies.sum(dim=-1, keepdim=True)
        has_entropy = total > 0
        weights = torch.where(
            has_entropy,
            1 - entropies / torch.where(has_entropy, total, 1.0),
            (num_teachers - 1) / num_teachers,
        )
        return weights / (num_teachers - 1) if self.normalize else weights
