"""Route each sample or token to the teachers a batch field names, and fuse within them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from kd_lightning.fusion.base import FusionContext, FusionRule


class RoutedTeachers(FusionRule, name="routed"):
    """Send each sample (or token) to the teachers its batch field names; fuse within them.

    Multi-domain and multi-task distillation route each example to its specialist teacher: TRL's
    ``DistillationTrainer`` takes a ``teacher_id`` column, multi-teacher on-policy setups route by
    task. Here the batch field ``field`` holds a route id per sample ``(B,)`` or per token
    ``(B, L)``. ``routes`` maps each id to the teachers (indices into the ensemble) that serve it;
    without ``routes``, id ``r`` is served by teacher ``r`` alone. An id of ``-1`` is served by
    every teacher. Within the served teachers the ``within`` rule decides: its weights are kept on
    them, zeroed elsewhere and renormalised, and the target mixes the served teachers'
    probabilities with those weights. (A ``within`` rule with a target of its own, such as
    ``mean_logits`` or ``vote``, contributes its weights only.)

    Args:
        field: the batch field holding the route ids.
        routes: route id → teacher indices; ``None``: id ``r`` → teacher ``r``.
        within: the rule fusing the served teachers, a :class:`FusionRule` or a registered name.

    Examples:
        >>> z = torch.zeros(3, 2, 4)  # K = 3 teachers, B = 2, C = 4
        >>> rule = RoutedTeachers(routes={0: [0], 1: [1, 2]})
        >>> rule(z, batch_fields={"teacher_id": torch.tensor([0, 1])}).weights.tolist()
        [[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]]
    """

    def __init__(
        self,
        field: str = "teacher_id",
        routes: Mapping[int, Sequence[int]] | None = None,
        within: FusionRule | str = "mean_probs",
    ) -> None:
        super().__init__()
        self.field = field
        self.routes = (
            None if routes is None else {int(r): [int(k) for k in t] for r, t in routes.items()}
        )
        for route, teachers in (self.routes or {}).items():
            if not teachers or min(teachers) < 0:
                raise ValueError(
                    f"RoutedTeachers: route {route} must name at least one teacher index >= 0, "
                    f"got {teachers}"
                )
        self.within = FusionRule.registry[within]() if isinstance(within, str) else within
        if self.within.batch_fields or self.within.student_layers:
            raise ValueError("RoutedTeachers: the within rule may not read batch fields or layers")

    @property
    def batch_fields(self) -> tuple[str, ...]:
        return (self.field,)

    @property
    def needs_labels(self) -> bool:  # type: ignore[override]
        return self.within.needs_labels

    @property
    def needs_student(self) -> bool:  # type: ignore[override]
        return self.within.needs_student

    def weights(self, teacher_logits: Tensor, context: FusionContext) -> Tensor:
        """The ``within`` rule's weights on the served teachers, renormalised, ``(*batch, K)``."""
        served = self.served(context.batch_fields[self.field], teacher_logits, context)
        inner = self.within.weights(teacher_logits, context) * served
        total = inner.sum(-1, keepdim=True)
        uniform = served / served.sum(-1, keepdim=True)
        return torch.where(total > 0, inner / total.clamp_min(1e-30), uniform)

    def served(self, route_ids: Tensor, teacher_logits: Tensor, context: FusionContext) -> Tensor:
        """``(*batch, K)``: 1 where a teacher serves the position's route, else 0."""
        num_teachers, *batch_shape, _ = teacher_logits.shape
        ids = route_ids.to(teacher_logits.device).long()
        while ids.ndim < len(batch_shape):  # a route per sequence serves all its tokens
            ids = ids.unsqueeze(-1)
        ids = ids.expand(batch_shape)
        ran = list(
            range(num_teachers) if context.teacher_indices is None else context.teacher_indices
        )
        served = teacher_logits.new_zeros(*batch_shape, num_teachers)
        for route in ids.unique().tolist():
            teachers = ran if route == -1 else self.teachers_of(route)
            row = torch.tensor([float(t in teachers) for t in ran], device=served.device)
            if not row.any():
                raise ValueError(
                    f"RoutedTeachers: route id {route} in batch field {self.field!r} is served by "
                    f"none of the teachers that ran {ran}"
                )
            served[ids == route] = row
        return served

    def teachers_of(self, route: int) -> list[int]:
        """The teachers serving ``route``."""
        if self.routes is None:
            return [route]
        return self.routes.get(route, [])

    def extra_repr(self) -> str:
        return f"field={self.field!r}, routes={self.routes}"
