"""The interface shared by every rule that fuses several teachers into one target."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

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

    Examples:
        >>> fusion = Fusion(weights=torch.full((2, 3), 1 / 3), target=torch.full((2, 4), 0.25))
        >>> fusion.weights.shape, fusion.target.shape
        (torch.Size([2, 3]), torch.Size([2, 4]))
    """

    weights: Tensor
    target: Tensor


@dataclass(frozen=True)
class FusionContext:
    """Everything a rule may read besides the teachers' logits; one object for every rule.

    Attributes:
        labels: Int64 class indices ``(*batch)``, or ``None`` (always set for rules with
            ``needs_labels``).
        temperature: The temperature ``T > 0`` of the distillation term.
        student_logits: The student's float32 logits ``(*batch, C)``, or ``None`` (always set
            for rules with ``needs_student``).
        student_features: The outputs of the student layers the rule names in
            :attr:`FusionRule.student_layers`, by layer name (a
            :class:`~kd_lightning.DistillationModule` taps them with
            :class:`~kd_lightning.models.taps.FeatureTaps`).
        teacher_indices: Which teachers the rows of the logits are, when only some of them ran
            (e.g. drawn per step); ``None``: all, in order. Rules with one parameter or weight per
            teacher read theirs at these indices.
        batch_fields: The batch fields the rule names in :attr:`FusionRule.batch_fields`, by
            name (e.g. a teacher id per sample or per token).

    Examples:
        >>> FusionContext(temperature=2.0).student_features
        {}
    """

    labels: Tensor | None = None
    temperature: float = 1.0
    student_logits: Tensor | None = None
    student_features: Mapping[str, Tensor] = field(default_factory=dict)
    teacher_indices: tuple[int, ...] | None = None
    batch_fields: Mapping[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class RuleOptimizer:
    """How a learned rule's own parameters train when not with the student's optimizer: their
    own optimizer, its learning rate divided by 10 at each epoch of ``milestones``, and a window
    of ``epochs`` training epochs after which the parameters stay as they are (learning rate 0).

    AMTML-KD's code trains its gate so (:class:`~kd_lightning.fusion.LearnedGate`). A
    :class:`~kd_lightning.DistillationModule` builds the optimizer with :meth:`build` and calls
    :meth:`start_epoch` at the start of every training epoch; a plain training loop does the same.

    Attributes:
        factory: called with the rule's parameters, e.g. ``partial(torch.optim.SGD, lr=0.1)``.
        milestones: epochs (counted from 0) from which the learning rate is divided by 10 once more.
        epochs: train during the first ``epochs`` epochs only; ``None``: throughout.

    Examples:
        >>> from functools import partial
        >>> plan = RuleOptimizer(partial(torch.optim.SGD, lr=0.1), milestones=(2,), epochs=3)
        >>> optimizer = plan.build([nn.Parameter(torch.zeros(1))])
        >>> rates = []
        >>> for epoch in range(4):
        ...     plan.start_epoch(optimizer, epoch)
        ...     rates.append(round(optimizer.param_groups[0]["lr"], 4))
        >>> rates
        [0.1, 0.1, 0.01, 0.0]
    """

    factory: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
    milestones: tuple[int, ...] = ()
    epochs: int | None = None

    def __post_init__(self) -> None:
        if any(int(m) != m or m < 0 for m in self.milestones):
            raise ValueError(f"lr_milestones must be epochs >= 0, got {list(self.milestones)}")
        if self.epochs is not None and (int(self.epochs) != self.epochs or self.epochs < 1):
            raise ValueError(f"train_epochs must be a whole number >= 1 or null, got {self.epochs}")

    @classmethod
    def from_options(
        cls,
        rule: str,
        optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None,
        lr_milestones: Sequence[int],
        train_epochs: int | None,
    ) -> RuleOptimizer | None:
        """A rule's plan from its ``optimizer``, ``lr_milestones`` and ``train_epochs`` options;
        ``None`` when ``optimizer`` is ``None`` (trained with the student's optimizer, so neither
        milestones nor a window can apply). Errors name the rule and the option.

        Examples:
            >>> RuleOptimizer.from_options("Rule", None, (), None) is None
            True
        """
        if optimizer is None:
            if list(lr_milestones) or train_epochs is not None:
                raise ValueError(
                    f"{rule}: lr_milestones and train_epochs need the rule's own optimizer; "
                    f"optimizer=None trains it with the student's, throughout"
                )
            return None
        try:
            return cls(optimizer, tuple(lr_milestones), train_epochs)
        except ValueError as error:
            raise ValueError(f"{rule}: {error}") from None

    def learning_rate_factor(self, epoch: int) -> float:
        """``0.1^(milestones reached)``, or 0 once the window of ``epochs`` is over."""
        if self.epochs is not None and epoch >= self.epochs:
            return 0.0
        return 0.1 ** sum(epoch >= milestone for milestone in self.milestones)

    def build(self, parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """The optimizer over ``parameters``, each group remembering its initial learning rate."""
        optimizer = self.factory(list(parameters))
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        return optimizer

    def start_epoch(self, optimizer: torch.optim.Optimizer, epoch: int) -> None:
        """Set ``optimizer``'s learning rates (built by :meth:`build`) for ``epoch``."""
        factor = self.learning_rate_factor(epoch)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor


class FusionRule(nn.Module, ABC):
    """A rule that turns stacked teacher logits into per-teacher weights and a fused target.

    Subclasses implement :meth:`weights`, which receives the teachers' logits and one
    :class:`FusionContext`. The default :meth:`target` mixes the teachers' temperature-scaled
    probabilities, ``Σ_k ŵ_k softmax(z_k / T)`` with ``ŵ = w / Σ_k w_k``. A rule declares what it
    reads: ``needs_labels`` (the ground truth), ``needs_student`` (the student's logits),
    :attr:`student_layers` (outputs of named student layers, e.g. a learned gate's features) and
    :attr:`batch_fields` (fields of the batch, e.g. a routed rule's teacher id). A rule with
    parameters may declare :attr:`own_optimizer`: its own optimizer and training window.

    A subclass that passes ``name="..."`` (``class Rule(FusionRule, name="rule")``) can be built
    by that name, e.g. ``DistillationLoss("rule")`` (see :func:`build_fusion`).

    Both outputs serve the two ways of distilling from several teachers: ``kl_T(target, s)``
    ("target" mode) or ``Σ_k w_k kl_T(p_k, s)`` ("loss" mode). For weights that do not depend on
    the student and sum to one, the two have the same gradient (identity E1).

    Examples:
        >>> class FirstTeacher(FusionRule):
        ...     def weights(self, teacher_logits, context):
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
    per_batch: ClassVar[bool] = False
    """Whether one weight vector serves the whole batch, computed from all of it (AE-KD's solve,
    one random draw per call); such a rule implements :meth:`batch_weights`, which a loss that
    splits the batch into chunks feeds chunk by chunk."""
    registry: ClassVar[dict[str, type[FusionRule]]] = {}

    def __init_subclass__(cls, name: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if name is not None:
            known = FusionRule.registry.get(name)
            if known is not None and _path(known) != _path(cls):
                raise ValueError(f"fusion rule name {name!r} is taken by {_path(known)}")
            FusionRule.registry[name] = cls

    @property
    def student_layers(self) -> tuple[str, ...]:
        """The student layers whose outputs the rule reads from ``student_features``; none by
        default."""
        return ()

    @property
    def batch_fields(self) -> tuple[str, ...]:
        """The batch fields the rule reads from ``batch_fields`` (e.g. a routing id); none by
        default."""
        return ()

    @property
    def own_optimizer(self) -> RuleOptimizer | None:
        """How the rule's parameters train apart from the student's (their own optimizer and
        window); ``None`` (the default): with the student's optimizer, throughout."""
        return None

    def forward(
        self,
        teacher_logits: Tensor,
        labels: Tensor | None = None,
        temperature: float = 1.0,
        student_logits: Tensor | None = None,
        student_features: Mapping[str, Tensor] | None = None,
        teacher_indices: Sequence[int] | None = None,
        batch_fields: Mapping[str, Tensor] | None = None,
    ) -> Fusion:
        """Fuse the teachers.

        Args:
            teacher_logits: Stacked teacher logits ``(K, *batch, C)``, e.g. ``(K, B, C)`` or
                ``(K, B, L, C)``. Cast to float32.
            labels: Integer class indices ``(*batch)``; required by rules with ``needs_labels``.
            temperature: Temperature ``T > 0`` of the fused target.
            student_logits: The student's logits ``(*batch, C)``; required by rules with
                ``needs_student``, ignored by the others. Cast to float32.
            student_features: The outputs of the layers in :attr:`student_layers`, by name;
                required by rules that name any.
            teacher_indices: The teachers the ``K`` rows are, when only some ran; ``None``: all.
            batch_fields: The fields in :attr:`batch_fields`, by name; required by rules that
                name any.

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
        features = dict(student_features or {})
        missing = [layer for layer in self.student_layers if layer not in features]
        if missing:
            raise ValueError(
                f"{rule} reads the student's {missing} layer outputs: pass them as "
                f"student_features (a DistillationModule taps them)"
            )
        fields = dict(batch_fields or {})
        absent = [name for name in self.batch_fields if name not in fields]
        if absent:
            raise ValueError(
                f"{rule} reads the batch fields {absent}: pass them as batch_fields (a "
                f"DistillationModule takes them from its dict batches)"
            )
        if teacher_indices is not None and len(teacher_indices) != teacher_logits.shape[0]:
            raise ValueError(
                f"{rule}: teacher_indices {list(teacher_indices)} name "
                f"{len(teacher_indices)} teachers but teacher_logits has K = "
                f"{teacher_logits.shape[0]}"
            )
        context = FusionContext(
            labels=labels,
            temperature=float(temperature),
            student_logits=None if student_logits is None else student_logits.float(),
            student_features=features,
            teacher_indices=None if teacher_indices is None else tuple(teacher_indices),
            batch_fields=fields,
        )
        logits = teacher_logits.float()
        weights = self.weights(logits, context)
        return Fusion(weights=weights, target=self.target(logits, weights, temperature))

    @abstractmethod
    def weights(self, teacher_logits: Tensor, context: FusionContext) -> Tensor:
        """Per-teacher weights.

        Args:
            teacher_logits: Float32 teacher logits ``(K, *batch, C)``.
            context: The labels, temperature, student logits and features (checked by
                :meth:`forward` against what the rule declares it needs).

        Returns:
            Non-negative float32 weights ``(*batch, K)``.
        """

    def penalty(self) -> Tensor | float:
        """A regulariser of the rule's own parameters that the loss adds to its objective; none
        (0) by default. Learned rules offer an L2 penalty (``l2``), as AMTML-KD trains its gate.

        Examples:
            >>> from kd_lightning.fusion import MeanProbabilities
            >>> MeanProbabilities().penalty()
            0.0
        """
        return 0.0

    def batch_weights(self, chunks: Iterable[tuple[Tensor, FusionContext]]) -> Tensor:
        """The weights ``(K,)`` of a :attr:`per_batch` rule, from the batch given in chunks.

        Args:
            chunks: ``(teacher_logits (K, n, C), context)`` for consecutive runs of positions whose
                union is the batch; each context holds those positions' labels, student logits
                and fields, and the batch's temperature and teacher indices.
        """
        raise NotImplementedError(f"{type(self).__name__} weighs each position on its own")

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


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def uniform_weights(teacher_logits: Tensor) -> Tensor:
    """Weights ``1/K`` for every teacher at every position.

    Args:
        teacher_logits: Teacher logits ``(K, *batch, C)``.

    Returns:
        Float32 weights ``(*batch, K)`` summing to one.

    Examples:
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
