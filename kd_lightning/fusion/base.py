"""The interface shared by every rule that fuses several teachers into one target."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class Fusion:
    """The output of a fusion rule.

    Attributes:
        weights: Per-position, per-teacher weights ``(*batch, K)``, float32 and non-negative.
            Whether they sum to one depends on the rule (each rule says so).
        target: Fused target distribution ``(*batch, C)`` at the requested temperature, float32,
            each row summing to one.

    Example:
        >>> fusion = Fusion(weights=torch.full((2, 3), 1 / 3), target=torch.full((2, 4), 0.25))
        >>> fusion.weights.shape, fusion.target.shape
        (torch.Size([2, 3]), torch.Size([2, 4]))
    """

    weights: Tensor
    target: Tensor


class FusionRule(nn.Module, ABC):
    """A rule that turns stacked teacher logits into per-teacher weights and a fused target.

    Subclasses implement :meth:`weights`; the default :meth:`target` mixes the teachers'
    temperature-scaled probabilities, ``Σ_k ŵ_k softmax(z_k / T)`` with ``ŵ = w / Σ_k w_k``.
    Rules that need the ground truth set ``needs_labels = True``; rules whose weights depend on the
    student (e.g. AE-KD) set ``needs_student = True``, add an optional ``student_logits`` keyword
    to their :meth:`weights` and override :meth:`_rule_weights` to pass it on.

    Both outputs serve the two ways of distilling from several teachers: ``kl_T(target, s)``
    ("target" mode) or ``Σ_k w_k kl_T(p_k, s)`` ("loss" mode). For weights that do not depend on
    the student and sum to one, the two have the same gradient (identity E1).

    Example:
        >>> class FirstTeacher(FusionRule):
        ...     def weights(self, teacher_logits, labels):
        ...         weights = torch.zeros_like(teacher_logits[..., 0]).movedim(0, -1)
        ...         weights[..., 0] = 1.0
        ...         return weights
        >>> z = torch.randn(3, 2, 5)  # K = 3 teachers, B = 2, C = 5
        >>> fusion = FirstTeacher()(z, temperature=2.0)
        >>> torch.allclose(fusion.target, torch.softmax(z[0] / 2.0, dim=-1))
        True
    """

    needs_labels: ClassVar[bool] = False
    needs_student: ClassVar[bool] = False

    def forward(
        self,
        teacher_logits: Tensor,
        labels: Tensor | None = None,
        temperature: float = 1.0,
        student_logits: Tensor | None = None,
    ) -> Fusion:
        """Fuse the teachers.

        Args:
            teacher_logits: Stacked teacher logits ``(K, *batch, C)``, e.g. ``(K, B, C)`` or
                ``(K, B, L, C)``. Cast to float32.
            labels: Integer class indices ``(*batch)``; required by rules with ``needs_labels``.
            temperature: Temperature ``T > 0`` of the fused target.
            student_logits: The student's logits ``(*batch, C)``; required by rules with
                ``needs_student``, ignored by the others. Cast to float32.

        Returns:
            The weights ``(*batch, K)`` and the target ``(*batch, C)``.
        """
        rule = type(self).__name__
        if teacher_logits.ndim < 3:
            raise ValueError(
                f"{rule}: teacher_logits must have shape (K, *batch, C) with at least 3 dims, "
                f"got shape {tuple(teacher_logits.shape)}"
            )
        if not temperature > 0:
            raise ValueError(f"{rule}: temperature must be > 0, got {temperature}")
        if labels is None and self.needs_labels:
            raise ValueError(f"{rule} needs labels: pass labels of shape (*batch) to forward")
        if labels is not None:
            batch_shape = teacher_logits.shape[1:-1]
            if labels.is_floating_point() or labels.is_complex():
                raise ValueError(
                    f"{rule}: labels must hold integer class indices, got dtype {labels.dtype}"
                )
            if labels.shape != batch_shape:
                raise ValueError(
                    f"{rule}: labels shape {tuple(labels.shape)} must equal the batch shape "
                    f"{tuple(batch_shape)} of teacher_logits {tuple(teacher_logits.shape)}"
                )
            labels = labels.long()
        if self.needs_student:
            if student_logits is None:
                raise ValueError(
                    f"{rule} needs the student's logits: pass student_logits of shape "
                    f"(*batch, C) to forward"
                )
            if student_logits.shape != teacher_logits.shape[1:]:
                raise ValueError(
                    f"{rule}: student_logits shape {tuple(student_logits.shape)} must equal "
                    f"{tuple(teacher_logits.shape[1:])}, the (*batch, C) of teacher_logits "
                    f"{tuple(teacher_logits.shape)}"
                )
            student_logits = student_logits.float()
        logits = teacher_logits.float()
        weights = self._rule_weights(logits, labels, temperature, student_logits)
        return Fusion(weights=weights, target=self.target(logits, weights, temperature))

    @abstractmethod
    def weights(self, teacher_logits: Tensor, labels: Tensor | None) -> Tensor:
        """Per-teacher weights.

        A rule with ``needs_student`` adds an optional ``student_logits`` keyword (float32
        ``(*batch, C)``), which its override of :meth:`_rule_weights` fills in.

        Args:
            teacher_logits: Float32 teacher logits ``(K, *batch, C)``.
            labels: Int64 class indices ``(*batch)``, or ``None``.

        Returns:
            Non-negative float32 weights ``(*batch, K)``.
        """

    def _rule_weights(
        self,
        teacher_logits: Tensor,
        labels: Tensor | None,
        temperature: float,
        student_logits: Tensor | None,
    ) -> Tensor:
        """Call :meth:`weights` for :meth:`forward`.

        A rule needing the temperature or the student's logits (checked and cast to float32 by
        :meth:`forward` when ``needs_student``) overrides it to pass them to its :meth:`weights`.
        """
        return self.weights(teacher_logits, labels)

    @property
    def selects_teachers(self) -> bool:
        """Whether :meth:`teachers_to_run` may name a subset: such a rule cannot serve feature
        hints, which read every teacher's layers."""
        return False

    def teachers_to_run(self, num_teachers: int) -> list[int] | None:
        """The teachers the next training step needs, asked before any teacher runs.

        A :class:`~kd_lightning.DistillationModule` asks once per training step and runs only the
        teachers named; this rule then receives their logits alone, in that order. ``None`` (the
        default) runs every teacher. Validation and test steps always run every teacher.

        Example:
            >>> from kd_lightning.fusion import MeanProbabilities
            >>> MeanProbabilities().teachers_to_run(3) is None
            True
        """
        return None

    def bind_student(self, student: nn.Module) -> None:
        """Attach to the student network, for rules that read its inner layers.

        A :class:`~kd_lightning.DistillationModule` calls it once with its student; the default
        does nothing.
        """

    def target(self, teacher_logits: Tensor, weights: Tensor, temperature: float) -> Tensor:
        """Mix the teachers' probabilities ``softmax(z_k / T)`` with the normalised weights.

        Args:
            teacher_logits: Float32 teacher logits ``(K, *batch, C)``.
            weights: Weights ``(*batch, K)`` from :meth:`weights`.
            temperature: Temperature ``T > 0``.

        Returns:
            The fused distribution ``(*batch, C)``.
        """
        normalised = weights / weights.sum(dim=-1, keepdim=True)
        probs = F.softmax(teacher_logits / temperature, dim=-1)
        return (normalised.movedim(-1, 0).unsqueeze(-1) * probs).sum(dim=0)


def uniform_weights(teacher_logits: Tensor) -> Tensor:
    """Weights ``1/K`` for every teacher at every position.

    Args:
        teacher_logits: Teacher logits ``(K, *batch, C)``.

    Returns:
        Float32 weights ``(*batch, K)`` summing to one.

    Example:
        >>> uniform_weights(torch.zeros(4, 2, 3))[0].tolist()
        [0.25, 0.25, 0.25, 0.25]
    """
    num_teachers, *batch_shape, _ = teacher_logits.shape
    return torch.full(
        (*batch_shape, num_teachers),
        1.0 / num_teachers,
        dtype=torch.float32,
        device=teacher_logits.device,
    )
