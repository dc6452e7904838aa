"""One teacher drawn at random per call: a stochastic estimate of the ensemble."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.fusion.base import FusionRule


class RandomTeacher(FusionRule):
    """Distil from a single teacher drawn uniformly at random for each call (each batch).

    Fukuda et al., "Efficient Knowledge Distillation from an Ensemble of Teachers", Interspeech
    2017. One index ``k`` is drawn per forward call with ``torch.randint`` on the logits' device,
    from the global generator (so ``torch.manual_seed`` reproduces the draws); the weights are
    one-hot on ``k`` for every sample and sum to one, and the target is that teacher's
    ``softmax(z_k / T)``. Since the distillation gradient is linear in the target, its expectation
    over the draw is the gradient with the
    :class:`~kd_lightning.fusion.averages.MeanProbabilities` target (identity E3): an unbiased,
    cheaper but noisier estimate.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> z = torch.randn(3, 2, 4)  # K = 3 teachers, B = 2, C = 4
        >>> fusion = RandomTeacher()(z)
        >>> k = int(fusion.weights[0].argmax())
        >>> torch.allclose(fusion.target, torch.softmax(z[k], dim=-1))
        True
    """

    def weights(self, teacher_logits: Tensor, labels: Tensor | None) -> Tensor:
        """One-hot weights on the drawn teacher, ``(*batch, K)``."""
        num_teachers, *batch_shape, _ = teacher_logits.shape
        drawn = torch.randint(num_teachers, (), device=teacher_logits.device)
        one_hot = F.one_hot(drawn, num_teachers).float()
        return one_hot.expand(*batch_shape, num_teachers)
