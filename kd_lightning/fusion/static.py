"""One fixed weight per teacher, the same for every sample."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from kd_lightning.fusion.base import FusionContext, FusionRule, uniform_weights


class StaticWeights(FusionRule, name="static"):
    """A fixed weight per teacher, shared by all samples: ``Σ_k w_k p_k``.

    The given non-negative ``weights`` normalised to sum to one, e.g. from the teachers'
    validation accuracies; with only ``num_teachers``, or nothing, they are uniform. To learn them
    with the student, use :class:`~kd_lightning.fusion.LearnedWeights`.

    Args:
        weights: Non-negative per-teacher weights, not all zero.
        num_teachers: The number of teachers, when ``weights`` is not given.

    Examples:
        >>> z = torch.zeros(2, 1, 3)  # K = 2 teachers, B = 1, C = 3
        >>> StaticWeights([3.0, 1.0])(z).weights.tolist()
        [[0.75, 0.25]]
    """

    fixed_weights: Tensor | None

    def __init__(
        self, weights: Sequence[float] | None = None, num_teachers: int | None = None
    ) -> None:
        super().__init__()
        self.register_buffer(
            "fixed_weights", normalised_weights(weights, num_teachers), persistent=False
        )

    def weights(self, teacher_logits: Tensor, context: FusionContext) -> Tensor:
        """The per-teacher weights, broadcast over the batch; see :class:`FusionRule`."""
        if self.fixed_weights is None:
            return uniform_weights(teacher_logits)
        per_teacher = of_teachers(self.fixed_weights, teacher_logits, context, type(self).__name__)
        return broadcast(per_teacher / per_teacher.sum(), teacher_logits)


def of_teachers(
    per_teacher: Tensor, teacher_logits: Tensor, context: FusionContext, rule: str
) -> Tensor:
    """The entries of a per-teacher tensor ``(K_all, ...)`` for the teachers that ran, checked
    against their number: all of them, or those at ``context.teacher_indices``."""
    num_teachers = teacher_logits.shape[0]
    indices = context.teacher_indices
    if indices is None:
        if per_teacher.shape[0] != num_teachers:
            raise ValueError(
                f"{rule} has {per_teacher.shape[0]} weights but teacher_logits has "
                f"K = {num_teachers} teachers"
            )
        return per_teacher
    if max(indices) >= per_teacher.shape[0]:
        raise ValueError(
            f"{rule} has {per_teacher.shape[0]} weights but is given teacher {max(indices)}"
        )
    return per_teacher[list(indices)]


def broadcast(per_teacher: Tensor, teacher_logits: Tensor) -> Tensor:
    """One weight per teacher ``(K,)`` broadcast to ``(*batch, K)`` on the logits' device."""
    num_teachers, *batch_shape, _ = teacher_logits.shape
    return per_teacher.to(teacher_logits.device).expand(*batch_shape, num_teachers)


def normalised_weights(
    weights: Sequence[float] | None, num_teachers: int | None, positive: bool = False
) -> Tensor | None:
    """Validate per-teacher weights and normalise them to sum to one; uniform with only
    ``num_teachers``; ``None`` when neither is given. ``positive`` refuses zeros."""
    if num_teachers is not None and num_teachers < 1:
        raise ValueError(f"num_teachers must be >= 1, got {num_teachers}")
    if weights is None:
        return (
            None
            if num_teachers is None
            else torch.full((num_teachers,), 1.0 / num_teachers, dtype=torch.float32)
        )
    values = [float(w) for w in weights]
    if not values:
        raise ValueError("weights must not be empty")
    if num_teachers is not None and len(values) != num_teachers:
        raise ValueError(f"got {len(values)} weights but num_teachers = {num_teachers}")
    if not all(math.isfinite(w) and w >= 0 for w in values):
        raise ValueError(f"weights must be finite and non-negative, got {values}")
    if sum(values) == 0:
        raise ValueError(f"weights must not all be zero, got {values}")
    if positive and min(values) == 0:
        raise ValueError(f"every weight must be > 0, got {values}")
    tensor = torch.tensor(values, dtype=torch.float32)
    return tensor / tensor.sum()
