"""AE-KD: teacher weights chosen in the space of the student-logit gradients.

Du, Liu, Li, Jiang, Ma, Zhou, Yang. "Agree to Disagree: Adaptive Ensemble Knowledge Distillation
in Gradient Space", NeurIPS 2020.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.fusion.base import FusionContext, FusionRule

GramKind = Literal["batch_mean", "flattened"]
GRAM_KINDS: tuple[GramKind, ...] = ("batch_mean", "flattened")


class GradientSpaceWeights(FusionRule, name="aekd"):
    """AE-KD (Du et al., NeurIPS 2020): per-batch teacher weights of minimum gradient norm.

    For each batch, ``g_k = ∂ kl_T(p_k, s) / ∂s`` is the gradient of teacher ``k``'s batch-mean KD
    term with respect to the student's LOGITS ``s`` (computed in closed form by
    :func:`kd_logit_gradients`, so no backward pass through the network runs and no parameter's
    ``.grad`` is touched), and the weights solve

        ``λ = argmin ‖Σ_k λ_k g_k‖²  over  {λ ≥ 0, Σ_k λ_k = 1, λ_k ≤ C}``

    with ``C = max_weight`` (:func:`min_norm_capped_simplex`). The student descends along the
    common direction on which the teachers agree; the cap keeps a single teacher from taking over.
    ``λ`` is detached (a constant for the student's backward pass) and is the same for every
    sample of the batch. Under DDP each process solves for its own batch.

    The paper's objective is ``(1 − α) CE + α Σ_k λ_k kl_T(p_k, s)``, i.e.
    ``DistillationLoss(GradientSpaceWeights(), aggregation="loss")``; the default target
    ``Σ_k λ_k p_k`` (``aggregation="target"``) also works and, λ being constant, has the same
    gradient. The paper's defaults are ``T = 4``, ``α = 0.9`` and ``C = 0.6``. The gradients are
    those of the forward KL (equal to soft cross-entropy's), whichever divergence the loss uses.

    Which ``g_k`` enter the Gram matrix ``G_kl = ⟨g_k, g_l⟩`` is set by ``gram``:

    * ``"batch_mean"`` (default, the authors' code, AnTuo1998/AE-KD ``find_optimal_svm``): each
      teacher's gradient is averaged over the batch (and positions) to one ``C``-vector first;
    * ``"flattened"``: each teacher's whole gradient, all ``B·C`` (or ``B·L·C``) entries, as the
      paper's equation reads for a batch. The two can give very different weights.

    The solve is exact, in torch on the logits' device; the authors' code instead runs ``K`` extra
    backward passes and an sklearn one-class-SVM dual on the CPU. The authors weight CE by 1 and
    KD by 0.9 (``--gamma 1 --alpha 0.9``), which ``DistillationLoss`` (weights ``1 − α`` and ``α``)
    cannot express exactly; ``α = 0.9`` keeps their KD weight.

    With a single teacher the weight is 1 (plain Hinton KD), whatever ``max_weight``. With
    ``K ≥ 2`` teachers the capped simplex is empty when ``C·K < 1``, which raises ``ValueError``.

    Args:
        max_weight: The cap ``C`` on any teacher's weight, in ``(0, 1]``; 1 means no cap.
        gram: ``"batch_mean"`` (the authors' code) or ``"flattened"`` (the paper's equation).
        iterations: The most accelerated projected-gradient steps of the solver (it stops once
            the KKT conditions certify its point optimal, usually much earlier).

    Examples:
        >>> z = torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 0.0, 4.0]]])  # K = 2 teachers, B = 1, C = 3
        >>> s = torch.zeros(1, 3)  # the student; teacher 0 is closer to it (smaller gradient)
        >>> def weights(rule):
        ...     fusion = rule(z, temperature=1.0, student_logits=s)
        ...     return [round(w, 4) for w in fusion.weights[0].tolist()]
        >>> weights(GradientSpaceWeights(max_weight=1.0)), weights(GradientSpaceWeights())
        ([0.778, 0.222], [0.6, 0.4])
        >>> GradientSpaceWeights()(z[:1], student_logits=s).weights.tolist()  # one teacher
        [[1.0]]
    """

    needs_student = True

    def __init__(
        self, max_weight: float = 0.6, iterations: int = 100, gram: GramKind = "batch_mean"
    ) -> None:
        super().__init__()
        if gram not in GRAM_KINDS:
            raise ValueError(
                f"GradientSpaceWeights: gram must be one of {GRAM_KINDS}, got {gram!r}"
            )
        self.gram = gram
        if not (math.isfinite(max_weight) and 0 < max_weight <= 1):
            raise ValueError(
                f"GradientSpaceWeights: max_weight must be in (0, 1], got {max_weight}"
            )
        if iterations < 1:
            raise ValueError(f"GradientSpaceWeights: iterations must be >= 1, got {iterations}")
        self.max_weight = float(max_weight)
        self.iterations = int(iterations)

    per_batch = True

    def weights(self, teacher_logits: Tensor, context: FusionContext) -> Tensor:
        """The weights ``λ`` broadcast to ``(*batch, K)``; see the class docstring.

        Args:
            teacher_logits: Float32 teacher logits ``(K, *batch, C)``.
            context: The student's logits (required; detached here) and the temperature ``T``
                of the KD terms whose gradients are compared.

        Returns:
            Detached float32 weights ``(*batch, K)``: non-negative, summing to one, each at most
            ``max_weight`` (when ``K ≥ 2``).
        """
        num_teachers, *batch_shape, _ = teacher_logits.shape
        return self.batch_weights([(teacher_logits, context)]).expand(*batch_shape, num_teachers)

    def batch_weights(self, chunks: Iterable[tuple[Tensor, FusionContext]]) -> Tensor:
        """``λ`` ``(K,)`` from the batch given in chunks: the Gram matrix is accumulated over them
        (each chunk's gradients, summed or multiplied out) and solved once."""
        summed: Tensor | None = None
        gram: Tensor | None = None
        positions = 0
        with torch.no_grad():
            for teacher_logits, context in chunks:
                student_logits = context.student_logits
                assert student_logits is not None  # FusionRule.forward enforces needs_student
                num_teachers, num_classes = teacher_logits.shape[0], teacher_logits.shape[-1]
                dtype = _solver_dtype(teacher_logits.device)
                # N·∂kl_T/∂s = T·(softmax(s / T) − p_k) per position (kd_logit_gradients without
                # the batch's 1/N, which no solution depends on).
                temperature = context.temperature
                gradients = temperature * (
                    F.softmax(student_logits.detach().float() / temperature, dim=-1)
                    - F.softmax(teacher_logits.float() / temperature, dim=-1)
                )
                positions += student_logits[..., 0].numel()
                if self.gram == "batch_mean":
                    chunk = gradients.reshape(num_teachers, -1, num_classes).sum(1).to(dtype)
                    summed = chunk if summed is None else summed + chunk
                else:
                    vectors = gradients.reshape(num_teachers, -1).to(dtype)
                    chunk = vectors @ vectors.T
                    gram = chunk if gram is None else gram + chunk
            if summed is not None:
                vectors = summed / max(positions, 1)
                gram = vectors @ vectors.T
        assert gram is not None, "GradientSpaceWeights.batch_weights needs at least one chunk"
        num_teachers = gram.shape[0]
        if num_teachers == 1:
            return gram.new_ones(1, dtype=torch.float32)
        if num_teachers * self.max_weight < 1:
            raise ValueError(
                f"GradientSpaceWeights: max_weight = {self.max_weight} with K = {num_teachers} "
                f"teachers leaves no weights summing to one (needs max_weight * K >= 1)"
            )
        return min_norm_capped_simplex(gram, self.max_weight, self.iterations).float()

    def extra_repr(self) -> str:
        return f"max_weight={self.max_weight}, iterations={self.iterations}, gram={self.gram!r}"


def kd_logit_gradients(
    teacher_logits: Tensor, student_logits: Tensor, temperature: float = 1.0
) -> Tensor:
    """Gradients of each teacher's batch-mean KD term with respect to the student's logits.

    ``∂ kl_T(p_k, s) / ∂s = T · (softmax(s / T) − p_k) / N`` for
    ``kl_T = T² · mean KL(p_k ‖ softmax(s / T))`` over the ``N`` positions of ``*batch``
    (:func:`~kd_lightning.functional.kl_divergence` with ``reduction="batchmean"``), with
    ``p_k = softmax(z_k / T)``. Closed form, so it also runs under ``torch.inference_mode``.

    Args:
        teacher_logits: Teacher logits ``(K, *batch, C)``.
        student_logits: Student logits ``(*batch, C)``.
        temperature: Temperature ``T > 0``.

    Returns:
        Float32 gradients ``(K, *batch, C)``.

    Examples:
        >>> kd_logit_gradients(torch.tensor([[[0.0, 0.0]]]), torch.tensor([[0.0, 0.0]])).tolist()
        [[[0.0, 0.0]]]
    """
    positions = max(student_logits[..., 0].numel(), 1)
    student_probs = F.softmax(student_logits.float() / temperature, dim=-1)
    teacher_probs = F.softmax(teacher_logits.float() / temperature, dim=-1)
    return (temperature / positions) * (student_probs - teacher_probs)


def min_norm_capped_simplex(gram: Tensor, max_weight: float, iterations: int = 100) -> Tensor:
    """Solve ``min_λ λᵀ G λ`` over ``{λ ≥ 0, Σ_k λ_k = 1, λ_k ≤ C}`` for a PSD ``K × K`` matrix.

    With ``G = g gᵀ`` this is the minimum-norm point ``‖Σ_k λ_k g_k‖²`` of AE-KD. Runs in torch on
    ``gram``'s device and dtype: accelerated projected gradient (FISTA with gradient restarts,
    step ``1 / L`` after scaling ``G`` to unit spectral norm) with the exact projection
    :func:`project_capped_simplex`. Every few steps, and after the last one, a polishing step
    solves the KKT system on the active set the iterate has found and keeps that point when it is
    feasible and no worse; it stops as soon as the KKT conditions certify the point optimal (one
    host synchronisation per check), usually within a few dozen steps. The result is optimal to
    rounding whenever the optimal active set was found within ``iterations`` steps.

    Args:
        gram: Symmetric positive semi-definite ``(K, K)``; float64 recommended.
        max_weight: The cap ``C``, with ``C·K ≥ 1``.
        iterations: Projected-gradient steps, ``≥ 1``.

    Returns:
        The minimiser ``λ`` ``(K,)`` in ``gram``'s dtype.

    Examples:
        >>> gram = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
        >>> min_norm_capped_simplex(gram, max_weight=1.0).tolist()  # ∝ 1 / diag
        [0.75, 0.25]
        >>> min_norm_capped_simplex(gram, max_weight=0.6).tolist()
        [0.6, 0.4]
    """
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square (K, K) matrix, got shape {tuple(gram.shape)}")
    num = gram.shape[0]
    if num * max_weight < 1:
        raise ValueError(
            f"the capped simplex is empty: max_weight = {max_weight} with K = {num} "
            f"(needs max_weight * K >= 1)"
        )
    gram = (gram + gram.T) / 2
    scale = torch.linalg.matrix_norm(gram, ord=2)
    gram = gram / torch.where(scale > 0, scale, torch.ones_like(scale))
    tolerance = _KKT_TOLERANCE[gram.dtype]
    # After scaling, ∇(λᵀGλ) = 2Gλ is 2-Lipschitz: step 1/2, so a step moves λ by -Gλ.
    x = gram.new_full((num,), 1.0 / num)
    y = x
    t = gram.new_ones(())
    for step in range(iterations + 1):
        if step % _CHECK_EVERY == 0 or step == iterations:
            candidate, certified = _polish(gram, x, max_weight, tolerance)
            if step == iterations or bool(certified):
                return candidate
        x_next = project_capped_simplex(y - gram @ y, max_weight)
        restart = torch.dot(y - x_next, x_next - x) > 0
        t_next = (1 + torch.sqrt(1 + 4 * t * t)) / 2
        momentum = torch.where(restart, torch.zeros_like(t), (t - 1) / t_next)
        y = x_next + momentum * (x_next - x)
        t = torch.where(restart, torch.ones_like(t), t_next)
        x = x_next
    raise AssertionError("unreachable")


_CHECK_EVERY = 5
_KKT_TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
}


def _polish(gram: Tensor, x: Tensor, max_weight: float, tolerance: float) -> tuple[Tensor, Tensor]:
    """Solve the KKT system on the active set of ``x``; keep that point if feasible and no worse.

    Returns the point and whether the KKT conditions certify it optimal: with ``h = 2Gλ``, some
    ``m`` has ``h_k = m`` on the free weights, ``h_k ≥ m`` at 0 and ``h_k ≤ m`` at the cap.
    """
    num = x.shape[0]
    free = (x > 0) & (x < max_weight)
    eye = torch.eye(num, dtype=x.dtype, device=x.device)
    rows = torch.where(free[:, None], 2 * gram, eye)
    multiplier = free.to(x.dtype)[:, None]
    kkt = torch.cat(
        [
            torch.cat([rows, multiplier], dim=1),
            torch.cat([x.new_ones(1, num), x.new_zeros(1, 1)], dim=1),
        ]
    )
    rhs = torch.cat([torch.where(free, torch.zeros_like(x), x), x.new_ones(1)])
    solution, _ = torch.linalg.solve_ex(kkt, rhs)
    candidate = solution[:num]
    slack = 64 * torch.finfo(x.dtype).eps
    feasible = (
        torch.isfinite(candidate).all()
        & (candidate >= -slack).all()
        & (candidate <= max_weight + slack).all()
    )
    candidate = torch.where(feasible, candidate, x).clamp(0, max_weight)
    candidate = torch.where(free, candidate, x)
    keep = feasible & (candidate @ gram @ candidate <= x @ gram @ x)
    point = torch.where(keep, candidate, x)
    slope = 2 * gram @ point
    at_zero, at_cap = (point <= 0) & ~free, (point >= max_weight) & ~free
    inf = torch.full_like(slope, torch.inf)
    highest = torch.where(at_zero, -inf, slope).max()  # over the free weights and those at the cap
    lowest = torch.where(at_cap, inf, slope).min()  # over the free weights and those at 0
    return point, highest <= lowest + tolerance


def project_capped_simplex(values: Tensor, max_weight: float) -> Tensor:
    """Euclidean projection onto ``{x : 0 ≤ x_k ≤ C, Σ_k x_k = 1}`` along the last dimension.

    The projection is ``clamp(v − τ, 0, C)`` with ``τ`` the root of the non-increasing,
    piecewise-linear ``Σ_k clamp(v_k − τ, 0, C) = 1``, found exactly from its ``2K`` breakpoints
    ``v_k − C`` and ``v_k``. Needs ``C·K ≥ 1``.

    Args:
        values: Points ``(..., K)``.
        max_weight: The cap ``C``.

    Returns:
        The projections ``(..., K)``.

    Examples:
        >>> project_capped_simplex(torch.tensor([2.0, 0.0, 0.0]), 0.5).tolist()
        [0.5, 0.25, 0.25]
    """
    breakpoints = torch.cat([values - max_weight, values], dim=-1).sort(dim=-1).values
    totals = (values.unsqueeze(-2) - breakpoints.unsqueeze(-1)).clamp(0, max_weight).sum(-1)
    last = breakpoints.shape[-1] - 1
    # Totals fall as τ grows: the root lies between the last breakpoint with total ≥ 1 and the next.
    low = ((totals >= 1).sum(-1, keepdim=True) - 1).clamp(0, last - 1)
    tau_low, tau_high = breakpoints.gather(-1, low), breakpoints.gather(-1, low + 1)
    total_low, total_high = totals.gather(-1, low), totals.gather(-1, low + 1)
    drop = total_low - total_high
    safe_drop = torch.where(drop > 0, drop, torch.ones_like(drop))
    tau = torch.where(
        drop > 0, tau_low + (total_low - 1) * (tau_high - tau_low) / safe_drop, tau_low
    )
    return (values - tau).clamp(0, max_weight)


def _solver_dtype(device: torch.device) -> torch.dtype:
    """Float64 for the small solve, except where the device has none (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64
