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

    The paper's point is cost: only one teacher need run per batch. With ``run_drawn_only=True``
    the teacher is drawn in :meth:`teachers_to_run`, before any teacher runs, so a
    :class:`~kd_lightning.DistillationModule` runs that one alone in training steps and this rule
    sees its logits as the only row (weight one). Validation and test steps still run (and
    measure) every teacher. The early draw comes from the global CPU generator (no device sync), so
    with the same seed it draws the same teachers as the default on CPU.

    Args:
        run_drawn_only: draw the teacher in :meth:`teachers_to_run`, so only it runs in training.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> z = torch.randn(3, 2, 4)  # K = 3 teachers, B = 2, C = 4
        >>> fusion = RandomTeacher()(z)
        >>> k = int(fusion.weights[0].argmax())
        >>> torch.allclose(fusion.target, torch.softmax(z[k], dim=-1))
        True
    """

    def __init__(self, run_drawn_only: bool = False) -> None:
        super().__init__()
        self.run_drawn_only = run_drawn_only

    @property
    def selects_teachers(self) -> bool:
        return self.run_drawn_only

    def teachers_to_run(self, num_teachers: int) -> list[int] | None:
        """With ``run_drawn_only``, the drawn teacher of the next training step; else ``None``.

        Example:
            >>> rule = RandomTeacher(run_drawn_only=True)
            >>> [k] = rule.teachers_to_run(3)
            >>> rule(torch.randn(1, 2, 4)).weights.tolist()  # the drawn teacher is the only row
            [[1.0], [1.0]]
        """
        if not self.run_drawn_only:
            return None
        return [int(torch.randint(num_teachers, ()))]

    def weights(self, teacher_logits: Tensor, labels: Tensor | None) -> Tensor:
        """One-hot weights on a teacher drawn now, ``(*batch, K)``; all ones for one teacher."""
        num_teachers, *batch_shape, _ = teacher_logits.shape
        if num_teachers == 1:
            return teacher_logits.new_ones(*batch_shape, 1, dtype=torch.float32)
        drawn = torch.randint(num_teachers, (), device=teacher_logits.device)
        one_hot = F.one_hot(drawn, num_teachers).float()
        return one_hot.expand(*batch_shape, num_teachers)
