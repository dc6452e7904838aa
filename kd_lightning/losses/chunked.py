"""The multi-teacher distillation objective in chunks of tokens: large vocabularies, bounded memory.

With ``K`` teachers, ``N`` positions and ``V`` classes, :class:`DistillationLoss` materialises
several ``K·N·V`` float32 tensors (the teachers' tempered softmaxes, the fused target, the
divergence's intermediates, all kept for backward). :class:`ChunkedDistillationLoss` computes the
same objective a chunk of positions at a time, in the forward pass and again in the backward pass
(recomputation, Chen et al., "Training Deep Nets with Sublinear Memory Cost", 2016; the
chunked-vocabulary losses of Liger Kernel, Hsu et al. 2024, and of "Cut Your Losses in
Large-Vocabulary Language Models", Wijmans et al. 2024, apply the same idea to the cross-entropy).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx
from torch.nn.parameter import is_lazy

from kd_lightning.functional.targets import probability_shift
from kd_lightning.fusion import FusionContext, FusionRule
from kd_lightning.losses.distillation import (
    Aggregation,
    DistillationLoss,
    DistillationOutput,
    _float32_region,
    check_shapes,
)
from kd_lightning.teachers.cache.topk import TopKLogits, expand_topk

CHUNK_ELEMENTS = 2**22
"""Automatic chunks hold about this many elements per stacked ``(K, chunk, V)`` tensor (16 MiB
in float32), whatever ``K``."""


class ChunkedDistillationLoss(DistillationLoss):
    """:class:`~kd_lightning.DistillationLoss` computed ``chunk_tokens`` positions at a time.

    Same constructor (plus ``chunk_tokens``), same inputs, same :class:`DistillationOutput`, the
    same loss and the same gradients (to float32 rounding: the sums run in another order). The
    positions of ``(*batch)`` are flattened to ``N`` and cut into chunks; a custom autograd
    function evaluates the cross-entropy, the fusion rule and the KD term chunk by chunk without
    keeping any graph, and its backward pass recomputes each chunk with autograd and writes that
    chunk's gradient into one preallocated gradient of the student logits. Beyond the logits the
    caller holds and that gradient (``N·V``, which any loss produces), memory stays at a few
    ``K × chunk × V`` temporaries; with the automatic chunk size the chunks shrink as ``K`` grows,
    so the peak hardly depends on the number of teachers.

    Rules: a rule whose weights at a position depend on that position alone (every rule of the
    library but two) is applied to each chunk as it is. A rule that weighs the whole batch at once
    (:attr:`~kd_lightning.fusion.FusionRule.per_batch`) gets a first pass that feeds it the
    chunks (:meth:`~kd_lightning.fusion.FusionRule.batch_weights`), and the loss pass uses the
    weights it returns: AE-KD accumulates its Gram matrix over the chunks and solves once,
    ``RandomTeacher`` draws once per call.

    Parameters of a rule (``LearnedWeights``, ``LearnedGate``) receive their gradients: the
    backward recomputation differentiates each chunk with respect to them too. A rule that reads
    student layers (``LearnedGate(student_layer=...)``) needs one feature row per position, so it
    works on ``(B, C)`` logits (its features are chunked with them) and is refused on token-level
    logits. A rule of your own must be per-position (the library cannot tell); teacher logits and
    student features that require gradients receive them.

    Differences from :class:`DistillationLoss`: the returned ``weights`` are detached (no graph
    to a learned rule's parameters; the loss keeps it), and the backward pass evaluates every
    chunk's terms once more (rule, softmaxes, divergence): on 2 CPU threads with ``K = 3``,
    ``V = 8192`` and ``N = 4096`` a forward and backward pass took about 1.2-1.3× the CPU time
    of the unchunked path with ``"mean_probs"``, about 2× with ``"entropy"`` (whose weights
    read every teacher's softmax again) and with AE-KD (one more pass for its Gram matrix).

    Args:
        fusion: a :class:`~kd_lightning.fusion.FusionRule` or a registered name.
        alpha: weight of the KD term; ``1 − alpha`` weighs the cross-entropy on labels.
        temperature: softmax temperature T.
        divergence: ``"kl"``, ``"reverse_kl"``, ``"js"``, ``"soft_ce"`` or ``"mse"``.
        aggregation: ``"target"`` or ``"loss"``.
        ignore_index: the label of padded positions.
        probability_shift: correct each teacher before fusion (Wen et al. 2019).
        topk_tail: how top-k teachers spread their mass beyond their top k (``"uniform"`` or
            ``"student"``; top-k teachers take the unchunked sparse path).
        chunk_tokens: positions per chunk; ``None`` sizes chunks so that a stacked
            ``(K, chunk, V)`` tensor holds about :data:`CHUNK_ELEMENTS` elements.

    Examples:
        >>> student = torch.randn(2, 6, 50, requires_grad=True)  # (B, L, V)
        >>> teachers, labels = torch.randn(3, 2, 6, 50), torch.randint(0, 50, (2, 6))
        >>> labels[1, 4:] = -100  # padding
        >>> chunked = ChunkedDistillationLoss("entropy", chunk_tokens=5)(student, teachers, labels)
        >>> plain = DistillationLoss("entropy")(student, teachers, labels)
        >>> torch.allclose(chunked.loss, plain.loss), chunked.weights.shape
        (True, torch.Size([2, 6, 3]))
        >>> grad_chunked, = torch.autograd.grad(chunked.loss, student)
        >>> grad_plain, = torch.autograd.grad(plain.loss, student)
        >>> torch.allclose(grad_chunked, grad_plain, atol=1e-7)
        True
    """

    def __init__(
        self,
        fusion: FusionRule | str = "mean_probs",
        alpha: float = 0.9,
        temperature: float = 4.0,
        divergence: str = "kl",
        aggregation: Aggregation = "target",
        ignore_index: int = -100,
        probability_shift: bool = False,
        topk_tail: str = "uniform",
        chunk_tokens: int | None = None,
    ) -> None:
        super().__init__(
            fusion,
            alpha,
            temperature,
            divergence,
            aggregation,
            ignore_index,
            probability_shift,
            topk_tail,
        )
        if chunk_tokens is not None and chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be a positive integer or None, got {chunk_tokens}")
        self.chunk_tokens = chunk_tokens

    def chunk_size(self, num_teachers: int, num_classes: int) -> int:
        """Positions per chunk for ``K`` teachers and ``V`` classes.

        Examples:
            >>> ChunkedDistillationLoss().chunk_size(num_teachers=2, num_classes=8192)
            256
        """
        if self.chunk_tokens is not None:
            return self.chunk_tokens
        return max(1, CHUNK_ELEMENTS // (num_teachers * num_classes))

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | TopKLogits,
        labels: Tensor,
        student_features: Mapping[str, Tensor] | None = None,
        teacher_indices: Sequence[int] | None = None,
        batch_fields: Mapping[str, Tensor] | None = None,
    ) -> DistillationOutput:
        """The objective of :meth:`DistillationLoss.forward`, chunk by chunk; see the class.
        Batch fields (one per sample or per position) are split with the positions. Top-k
        teacher outputs that the loss :attr:`accepts_topk` take the sparse path unchunked (it
        builds no ``K × N × V`` tensor); others are expanded, then chunked."""
        if isinstance(teacher_logits, TopKLogits):
            if self.accepts_topk:
                return super().forward(
                    student_logits, teacher_logits, labels, None, teacher_indices
                )
            teacher_logits = expand_topk(teacher_logits)
        padded = check_shapes(student_logits, teacher_logits, labels, self.ignore_index)
        num_teachers, num_classes = teacher_logits.shape[0], student_logits.shape[-1]
        student = student_logits.reshape(-1, num_classes)
        teachers = teacher_logits.reshape(num_teachers, -1, num_classes)
        flat_labels = labels.reshape(-1)
        features = self._features(student_logits, student_features)
        fields = {
            name: _per_position(value, labels.shape) for name, value in (batch_fields or {}).items()
        }
        size = self.chunk_size(num_teachers, num_classes)
        chunks = [
            (start, min(start + size, len(student))) for start in range(0, len(student), size)
        ]
        with _float32_region(student_logits.device.type):
            if any(is_lazy(parameter) for parameter in self.fusion.parameters()) and chunks:
                self._materialise(student, teachers, flat_labels, features, padded, fields)
            plan = _Plan(
                loss=self,
                labels=flat_labels,
                padded=padded,
                chunks=chunks,
                feature_names=tuple(features),
                teacher_indices=None if teacher_indices is None else tuple(teacher_indices),
                batch_fields=fields,
                fixed_weights=self._batch_weights(
                    student, teachers, flat_labels, padded, chunks, teacher_indices, fields
                ),
                parameters=tuple(p for p in self.fusion.parameters() if p.requires_grad),
            )
            hard_sum, soft_sum, weights = _ChunkedObjective.apply(
                plan, student, teachers, *features.values(), *plan.parameters
            )
            real = labels != self.ignore_index if padded else None
            count: Tensor | int = (
                max(labels.numel(), 1) if real is None else real.sum().clamp_min(1)
            )
            hard, soft = hard_sum / count, soft_sum / count
            loss = (1.0 - self.alpha) * hard + self.alpha * soft + self.fusion.penalty()
        return DistillationOutput(
            loss=loss,
            hard=hard,
            soft=soft,
            weights=weights.reshape(*labels.shape, num_teachers),
            real=real,
        )

    def _chunk_terms(
        self,
        student: Tensor,
        teachers: Tensor,
        labels: Tensor,
        padded: bool,
        features: Mapping[str, Tensor],
        fixed_weights: Tensor | None = None,
        teacher_indices: tuple[int, ...] | None = None,
        batch_fields: Mapping[str, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The summed cross-entropy, the summed KD term and the weights ``(n, K)`` of one chunk.

        Args:
            student: Student logits ``(n, V)``.
            teachers: Teacher logits ``(K, n, V)``.
            labels: Labels ``(n,)``, ``ignore_index`` at padding.
            padded: Whether the batch holds padding (if not, no mask is built).
            features: The chunk's rows of the student features the rule reads.
            fixed_weights: The chunk's rows of weights set for the whole batch (AE-KD, random
                teacher), or ``None`` to call the rule on the chunk.
            teacher_indices: Which teachers the rows of ``teachers`` are; ``None``: all.
            batch_fields: The chunk's rows of the batch fields the rule reads.
        """
        student, teachers, rule_labels, real = self._prepare(student, teachers, labels, padded)
        if fixed_weights is None:
            fusion = self.fusion(
                teachers,
                rule_labels,
                self.temperature,
                student_logits=student,
                student_features=features,
                teacher_indices=teacher_indices,
                batch_fields=batch_fields,
            )
            weights, target = fusion.weights, fusion.target
        else:
            weights = fixed_weights
            target = self.fusion.target(teachers, weights, self.temperature)
        hard = F.cross_entropy(student, labels, ignore_index=self.ignore_index, reduction="sum")
        per_position = self._soft_term(student, teachers, weights, target)
        if real is not None:
            per_position = torch.where(real, per_position, 0.0)
            weights = torch.where(real.unsqueeze(-1), weights, 0.0)
        return hard, per_position.sum(), weights

    def _prepare(
        self, student: Tensor, teachers: Tensor, labels: Tensor, padded: bool
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Float32 logits, neutral (zero) at padded positions, the teachers shifted if asked, and
        the labels the rule sees (0 at padding); as :meth:`DistillationLoss.forward` does."""
        student, teachers, rule_labels, real = student.float(), teachers.float(), labels, None
        if padded:
            real = labels != self.ignore_index
            student = torch.where(real.unsqueeze(-1), student, 0.0)
            teachers = torch.where(real.unsqueeze(-1), teachers, 0.0)
            rule_labels = torch.where(real, labels, 0)
        if self.probability_shift:
            teachers = probability_shift(teachers, rule_labels)
        return student, teachers, rule_labels, real

    def _features(
        self, student_logits: Tensor, student_features: Mapping[str, Tensor] | None
    ) -> dict[str, Tensor]:
        """The student features the rule reads, one row per position, or a clear refusal."""
        layers = self.fusion.student_layers
        if not layers:
            return {}
        rule = type(self.fusion).__name__
        if student_logits.ndim != 2:
            raise ValueError(
                f"ChunkedDistillationLoss cannot chunk {rule}: it reads the student's {list(layers)} "
                f"layer outputs, one row per sample, which do not split by token for logits of "
                f"shape {tuple(student_logits.shape)}; use DistillationLoss, or the rule without "
                f"student layers"
            )
        features = dict(student_features or {})
        missing = [layer for layer in layers if layer not in features]
        if missing:
            raise ValueError(
                f"{rule} reads the student's {missing} layer outputs: pass them as "
                f"student_features (a DistillationModule taps them)"
            )
        for layer in layers:
            if features[layer].shape[0] != student_logits.shape[0]:
                raise ValueError(
                    f"{rule}: the student's {layer!r} output has {features[layer].shape[0]} rows "
                    f"but the logits have {student_logits.shape[0]}"
                )
        return {layer: features[layer] for layer in layers}

    def _materialise(
        self,
        student: Tensor,
        teachers: Tensor,
        labels: Tensor,
        features: Mapping[str, Tensor],
        padded: bool,
        fields: Mapping[str, Tensor],
    ) -> None:
        """Let a rule with lazy parameters (``LearnedGate(feature_dim=None)``) create them on one
        position, before they are handed to the autograd function."""
        with torch.no_grad():
            self._chunk_terms(
                student[:1],
                teachers[:, :1],
                labels[:1],
                padded,
                {name: value[:1] for name, value in features.items()},
                batch_fields={name: value[:1] for name, value in fields.items()},
            )

    def _batch_weights(
        self,
        student: Tensor,
        teachers: Tensor,
        labels: Tensor,
        padded: bool,
        chunks: Sequence[tuple[int, int]],
        teacher_indices: Sequence[int] | None,
        fields: Mapping[str, Tensor],
    ) -> Tensor | None:
        """Weights ``(N, K)`` of a rule that weighs the whole batch at once, fed the chunks as
        each chunk's pass would see them; ``None`` for per-position rules."""
        if not self.fusion.per_batch:
            return None

        def chunk_inputs() -> Iterator[tuple[Tensor, FusionContext]]:
            for start, stop in chunks:
                chunk_student, chunk_teachers, rule_labels, _ = self._prepare(
                    student[start:stop], teachers[:, start:stop], labels[start:stop], padded
                )
                yield (
                    chunk_teachers,
                    FusionContext(
                        labels=rule_labels,
                        temperature=self.temperature,
                        student_logits=chunk_student,
                        teacher_indices=None if teacher_indices is None else tuple(teacher_indices),
                        batch_fields={name: value[start:stop] for name, value in fields.items()},
                    ),
                )

        with torch.no_grad():
            per_teacher = self.fusion.batch_weights(chunk_inputs())
        return per_teacher.expand(len(labels), teachers.shape[0])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk_tokens={self.chunk_tokens}"


@dataclass(frozen=True)
class _Plan:
    """What the autograd function needs besides its tensor inputs."""

    loss: ChunkedDistillationLoss
    labels: Tensor
    padded: bool
    chunks: list[tuple[int, int]]
    feature_names: tuple[str, ...]
    teacher_indices: tuple[int, ...] | None
    batch_fields: Mapping[str, Tensor]
    fixed_weights: Tensor | None
    parameters: tuple[nn.Parameter, ...]

    def terms(
        self, start: int, stop: int, student: Tensor, teachers: Tensor, features: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`ChunkedDistillationLoss._chunk_terms` of the chunk ``[start, stop)``."""
        return self.loss._chunk_terms(
            student,
            teachers,
            self.labels[start:stop],
            self.padded,
            dict(zip(self.feature_names, features, strict=True)),
            None if self.fixed_weights is None else self.fixed_weights[start:stop],
            self.teacher_indices,
            {name: value[start:stop] for name, value in self.batch_fields.items()},
        )


class _ChunkedObjective(torch.autograd.Function):
    """``(Σ CE, Σ KD, weights)`` over all chunks; backward recomputes one chunk at a time.

    Inputs: the plan, student logits ``(N, V)``, teacher logits ``(K, N, V)``, the student
    features (rows along dim 0), then the rule's parameters (whole).
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx, plan: _Plan, student: Tensor, teachers: Tensor, *rest: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        features = rest[: len(plan.feature_names)]
        hard = torch.zeros((), dtype=torch.float32, device=student.device)
        soft = torch.zeros((), dtype=torch.float32, device=student.device)
        weights = torch.zeros(
            len(student), teachers.shape[0], dtype=torch.float32, device=student.device
        )
        for start, stop in plan.chunks:
            chunk_hard, chunk_soft, chunk_weights = plan.terms(
                start,
                stop,
                student[start:stop],
                teachers[:, start:stop],
                [feature[start:stop] for feature in features],
            )
            hard += chunk_hard
            soft += chunk_soft
            weights[start:stop] = chunk_weights
        ctx.plan = plan  # type: ignore[attr-defined]
        ctx.save_for_backward(student, teachers, *features)
        ctx.mark_non_differentiable(weights)
        return hard, soft, weights

    @staticmethod
    def backward(
        ctx: Any, grad_hard: Tensor, grad_soft: Tensor, grad_weights: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        plan: _Plan = ctx.plan
        student, teachers, *features = ctx.saved_tensors
        chunked = [(student, 0), (teachers, 1), *((feature, 0) for feature in features)]
        needs = ctx.needs_input_grad[1:]
        chunked_needs = needs[: len(chunked)]
        parameter_needs = needs[len(chunked) :]
        grads: list[Tensor | None] = [
            torch.zeros_like(tensor) if need else None
            for (tensor, _), need in zip(chunked, chunked_needs, strict=True)
        ]
        parameter_grads: list[Tensor | None] = [
            torch.zeros_like(parameter) if need else None
            for parameter, need in zip(plan.parameters, parameter_needs, strict=True)
        ]
        with _float32_region(student.device.type):
            for start, stop in plan.chunks:
                with torch.enable_grad():
                    leaves = [
                        tensor.narrow(dim, start, stop - start).detach().requires_grad_(need)
                        for (tensor, dim), need in zip(chunked, chunked_needs, strict=True)
                    ]
                    hard, soft, _ = plan.terms(start, stop, leaves[0], leaves[1], leaves[2:])
                    total = grad_hard * hard + grad_soft * soft
                    wanted = [leaf for leaf in leaves if leaf.requires_grad]
                    wanted += [
                        p for p, need in zip(plan.parameters, parameter_needs, strict=True) if need
                    ]
                    # A chunk whose terms depend on nothing that wants a gradient (e.g. only
                    # the teachers do, through a vote's one-hot target) leaves its zeros.
                    if not (wanted and total.requires_grad):
                        continue
                    found = iter(torch.autograd.grad(total, wanted, allow_unused=True))
                for (_, dim), grad in zip(chunked, grads, strict=True):
                    if grad is not None:
                        value = next(found)
                        if value is not None:
                            grad.narrow(dim, start, stop - start).copy_(value)
                for grad in parameter_grads:
                    if grad is not None:
                        value = next(found)
                        if value is not None:
                            grad += value
        return (None, *grads, *parameter_grads)


def _per_position(field: Tensor, batch_shape: torch.Size) -> Tensor:
    """A batch field of one value per sample ``(B,)`` or per position ``(*batch)``, as one row
    per position ``(N,)``."""
    while field.ndim < len(batch_shape):
        field = field.unsqueeze(-1)
    return field.expand(batch_shape).reshape(-1)
