"""One weight per teacher, the same for every sample: fixed or learned."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.fusion.base import FusionRule


class StaticWeights(FusionRule):
    """A fixed or learnable weight per teacher, shared by all samples: ``Σ_k w_k p_k``.

    Fixed (``learnable=False``): the given non-negative ``weights`` normalised to sum to one, e.g.
    from the teachers' validation accuracies; with only ``num_teachers``, or nothing, they are
    uniform. Learnable (``learnable=True``): ``w = softmax(θ)`` over a free parameter ``θ``, the
    ``nn.Parameter`` ``weight_logits``, initialised at the log of the normalised ``weights`` (zeros,
    i.e. uniform, with only ``num_teachers``). It trains with whichever optimizer holds this
    module's parameters and is saved in its ``state_dict``. Weights sum to one in both modes.

    Caution: trained on the distillation loss alone, learnable weights drift toward the teacher
    the student already matches best, since that lowers the loss.

    Args:
        weights: Non-negative per-teacher weights, not all zero (strictly positive if learnable).
        num_teachers: The number of teachers, when ``weights`` is not given.
        learnable: Learn the weights as ``softmax(θ)``; needs ``weights`` or ``num_teachers``.

    Example:
        >>> z = torch.zeros(2, 1, 3)  # K = 2 teachers, B = 1, C = 3
        >>> StaticWeights([3.0, 1.0])(z).weights.tolist()
        [[0.75, 0.25]]
        >>> rule = StaticWeights(num_teachers=2, learnable=True)
        >>> rule(z).weights.tolist(), len(list(rule.parameters()))
        ([[0.5, 0.5]], 1)
    """

    def __init__(
        self,
        weights: Sequence[float] | None = None,
        num_teachers: int | None = None,
        learnable: bool = False,
    ) -> None:
        super().__init__()
        initial = _initial_weights(weights, num_teachers, learnable)
        self.weight_logits: nn.Parameter | None
        self.fixed_weights: Tensor | None
        if learnable:
            if initial is None:
                raise ValueError("StaticWeights(learnable=True) needs `weights` or `num_teachers`")
            self.register_parameter("weight_logits", nn.Parameter(initial.log()))
            self.register_buffer("fixed_weights", None)
        else:
            self.register_parameter("weight_logits", None)
            self.register_buffer("fixed_weights", initial, persistent=False)

    def weights(self, teacher_logits: Tensor, labels: Tensor | None) -> Tensor:
        """The per-teacher weights, broadcast over the batch; see :class:`FusionRule`."""
        num_teachers, *batch_shape, _ = teacher_logits.shape
        if self.weight_logits is not None:
            per_teacher = F.softmax(self.weight_logits, dim=0)
        elif self.fixed_weights is not None:
            per_teacher = self.fixed_weights
        else:
            per_teacher = teacher_logits.new_full((num_teachers,), 1.0 / num_teachers)
        if per_teacher.shape[0] != num_teachers:
            raise ValueError(
                f"StaticWeights has {per_teacher.shape[0]} weights but teacher_logits has "
                f"K = {num_teachers} teachers"
            )
        return per_teacher.to(teacher_logits.device).expand(*batch_shape, num_teachers)


def _initial_weights(
    weights: Sequence[float] | None, num_teachers: int | None, learnable: bool
) -> Tensor | None:
    """Validate the constructor's arguments; return the normalised weights, or None if unknown."""
    if num_teachers is not None and num_teachers < 1:
        raise ValueError(f"StaticWeights: num_teachers must be >= 1, got {num_teachers}")
    if weights is None:
        return (
            None
            if num_teachers is None
            else torch.full((num_teachers,), 1.0 / num_teachers, dtype=torch.float32)
        )
    values = [float(w) for w in weights]
    if not values:
        raise ValueError("StaticWeights: weights must not be empty")
    if num_teachers is not None and len(values) != num_teachers:
        raise ValueError(
            f"StaticWeights: got {len(values)} weights but num_teachers = {num_teachers}"
        )
    if not all(math.isfinite(w) and w >= 0 for w in values):
        raise ValueError(f"StaticWeights: weights must be finite and non-negative, got {values}")
    if sum(values) == 0:
        raise ValueError(f"StaticWeights: weights must not all be zero, got {values}")
    if learnable and min(values) == 0:
        raise ValueError(
            "StaticWeights(learnable=True) initialises its logits at log(weights), so every weight "
            f"must be > 0, got {values}"
        )
    tensor = torch.tensor(values, dtype=torch.float32)
    return tensor / tensor.sum()
