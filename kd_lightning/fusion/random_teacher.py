"""One teacher drawn at random per call: a stochastic estimate of the ensemble."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.fusion.base import FusionContext, FusionRule


class RandomTeacher(FusionRule, name="random"):
    """Distil from a single teacher drawn uniformly at random for each call (each batch).

    Fukuda et al., "Efficient Knowledge Distillation from an Ensemble of Teachers", Interspeech
    2017. One index ``k`` is drawn per forward call with ``torch.randint`` on the logits' device,
    from the global generator (so ``torch.manual_seed`` reproduces the draws); the weights are
    one-hot on ``k`` for every sample and sum to one, and the target is that teacher's
    ``softmax(z_k / T)``. Since the distillation gradient is linear in the target, its expectation
    over the draw is the gradient with the
    :class:`~kd_lightning.fusion.averages.MeanProbabilities` target (identity E3): an unbiased,
    cheaper but noisier estimate.

    The paper's point is cost: only one teacher need run per batch. This rule runs every teacher
    and keeps one; to run only the drawn one, draw it before any teacher runs with the teacher
    source :class:`~kd_lightning.teachers.DrawnTeachers` (``teacher_runtime.draw_per_step=1``),
    under which any rule (e.g. mean of probabilities) sees that teacher alone.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> z = torch.randn(3, 2, 4)  # K = 3 teachers, B = 2, C = 4
        >>> fusion = RandomTeacher()(z)
        >>> k = int(fusion.weights[0].argmax())
        >>> torch.allclose(fusion.target, torch.softmax(z[k], dim=-1))
        True
    """

    per_batch = True

    def weights(self, teacher_logits: Tensor, context: FusionContext) -> Tensor:
        """One-hot weights on a teacher drawn now, ``(*batch, K)``; all ones for one teacher."""
        num_teachers, *batch_shape, _ = teacher_logits.shape
        drawn = self.batch_weights([(teacher_logits, context)])
        return drawn.expand(*batch_shape, num_teachers)

    def batch_weights(self, chunks: Iterable[tuple[Tensor, FusionContext]]) -> Tensor:
        """One draw for the whole batch, ``(K,)`` one-hot (the draw reads only ``K`` and the
        device)."""
        teacher_logits, _ = next(iter(chunks))
        num_teachers = teacher_logits.shape[0]
        if num_teachers == 1:
            return teacher_logits.new_ones(1, dtype=torch.float32)
        drawn = torch.randint(num_teachers, (), device=teacher_logits.device)
        return F.one_hot(drawn, num_teachers).float()
