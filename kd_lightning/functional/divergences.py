"""Divergences between a student's logits and a target distribution.

Every function computes in float32 (inputs are cast with ``.float()``, so float16 and bfloat16
logits under AMP give float32 losses), treats the LAST dimension as the class dimension and
accepts any number of leading dimensions, e.g. ``(B, C)`` for classification or ``(B, L, V)`` for
sequences.

``reduction`` is one of:

* ``"none"``: one value per leading position, shape ``logits.shape[:-1]``;
* ``"batchmean"``: the mean over all leading positions. For ``(B, C)`` inputs this is the sum
  divided by ``B``, i.e. torch's ``batchmean``; it is never divided by the number of classes (the
  ``nn.KLDivLoss(reduction="mean")`` pitfall);
* ``"sum"``: the sum over all leading positions.

Temperature-scaled divergences are multiplied by ``T²`` (Hinton, Vinyals, Dean 2015) so that their
gradients keep the same scale as the temperature changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_REDUCTIONS: tuple[str, ...] = ("none", "batchmean", "sum")

_FLOAT32_TINY = torch.finfo(torch.float32).tiny


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_same_shape(student_logits: Tensor, other: Tensor, other_name: str) -> None:
    if student_logits.ndim == 0:
        raise ValueError("student_logits must have a class dimension (last dim), got a 0-d tensor")
    if student_logits.shape != other.shape:
        raise ValueError(
            f"student_logits shape {tuple(student_logits.shape)} and {other_name} shape "
            f"{tuple(other.shape)} must match"
        )


def _student_log_probs(
    student_logits: Tensor, target_probs: Tensor, temperature: float, reduction: str
) -> Tensor:
    """Check the arguments of a divergence to ``target_probs``; return ``log_softmax(s / T)``."""
    _check_reduction(reduction)
    _check_temperature(temperature)
    _check_same_shape(student_logits, target_probs, "target_probs")
    return F.log_softmax(student_logits.float() / temperature, dim=-1)


def _reduce(per_position: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return per_position
    if reduction == "sum":
        return per_position.sum()
    return per_position.mean()


def kl_divergence(
    student_logits: Tensor,
    target_probs: Tensor,
    temperature: float = 1.0,
    reduction: str = "batchmean",
) -> Tensor:
    """Forward KL ``T² · KL(p ‖ softmax(s / T))``, the canonical distillation term.

    Zero entries of ``p`` contribute zero (``0 · log 0 = 0``), so one-hot targets are allowed.

    Args:
        student_logits: Student logits ``(..., C)``.
        target_probs: Target distribution ``(..., C)``, already at temperature ``T``.
        temperature: Softmax temperature ``T > 0`` applied to the student.
        reduction: ``"none"``, ``"batchmean"`` or ``"sum"``.

    Returns:
        The float32 divergence, reduced as requested.

    Examples:
        >>> s = torch.tensor([[0.0, 0.0]])
        >>> p = torch.tensor([[1.0, 0.0]])
        >>> round(kl_divergence(s, p).item(), 4)  # 1 · (log 1 - log ½) = log 2
        0.6931
    """
    student_log_probs = _student_log_probs(student_logits, target_probs, temperature, reduction)
    p = target_probs.float()
    # kl_div is Σ xlogy(p, p) − p · log q in one kernel, with one autograd node
    per_position = F.kl_div(student_log_probs, p, reduction="none").sum(dim=-1)
    return _reduce(temperature**2 * per_position, reduction)


def reverse_kl_divergence(
    student_logits: Tensor,
    target_probs: Tensor,
    temperature: float = 1.0,
    reduction: str = "batchmean",
) -> Tensor:
    """Reverse KL ``T² · KL(softmax(s / T) ‖ p)``, the mode-seeking direction.

    ``log p`` is clamped at the smallest normal float32, so a one-hot target gives a large but
    finite value.

    Args:
        student_logits: Student logits ``(..., C)``.
        target_probs: Target distribution ``(..., C)``, already at temperature ``T``.
        temperature: Softmax temperature ``T > 0`` applied to the student.
        reduction: ``"none"``, ``"batchmean"`` or ``"sum"``.

    Returns:
        The float32 divergence, reduced as requested.

    Examples:
        >>> s = torch.tensor([[0.0, 0.0]])
        >>> p = torch.tensor([[0.5, 0.5]])
        >>> round(reverse_kl_divergence(s, p).item(), 4)
        0.0
    """
    student_log_probs = _student_log_probs(student_logits, target_probs, temperature, reduction)
    target_log_probs = target_probs.float().clamp_min(_FLOAT32_TINY).log()
    per_position = (student_log_probs.exp() * (student_log_probs - target_log_probs)).sum(dim=-1)
    return _reduce(temperature**2 * per_position, reduction)


def js_divergence(
    student_logits: Tensor,
    target_probs: Tensor,
    temperature: float = 1.0,
    reduction: str = "batchmean",
) -> Tensor:
    """Jensen-Shannon divergence ``T² · [½ KL(p ‖ m) + ½ KL(q ‖ m)]`` with ``m = (p + q) / 2``.

    Symmetric, bounded by ``T² · log 2`` and finite for one-hot targets.

    Args:
        student_logits: Student logits ``(..., C)``; ``q = softmax(s / T)``.
        target_probs: Target distribution ``p`` ``(..., C)``, already at temperature ``T``.
        temperature: Softmax temperature ``T > 0`` applied to the student.
        reduction: ``"none"``, ``"batchmean"`` or ``"sum"``.

    Returns:
        The float32 divergence, reduced as requested.

    Examples:
        >>> s = torch.tensor([[0.0, -1e4]])  # q = (1, 0)
        >>> p = torch.tensor([[0.0, 1.0]])
        >>> round(js_divergence(s, p).item(), 4)  # disjoint supports: log 2
        0.6931
    """
    student_log_probs = _student_log_probs(student_logits, target_probs, temperature, reduction)
    p = target_probs.float()
    q = student_log_probs.exp()
    log_m = ((p + q) / 2).clamp_min(_FLOAT32_TINY).log()
    kl_p_m = (torch.xlogy(p, p) - p * log_m).sum(dim=-1)
    kl_q_m = (q * (student_log_probs - log_m)).sum(dim=-1)
    return _reduce(temperature**2 * 0.5 * (kl_p_m + kl_q_m), reduction)


def soft_cross_entropy(
    student_logits: Tensor,
    target_probs: Tensor,
    temperature: float = 1.0,
    reduction: str = "batchmean",
) -> Tensor:
    """Cross-entropy with soft targets ``T² · (-Σ_c p_c log_softmax(s / T)_c)``.

    Equals :func:`kl_divergence` plus ``T² · H(p)``, a constant in the student, so the gradients
    agree.

    Args:
        student_logits: Student logits ``(..., C)``.
        target_probs: Target distribution ``(..., C)``, already at temperature ``T``.
        temperature: Softmax temperature ``T > 0`` applied to the student.
        reduction: ``"none"``, ``"batchmean"`` or ``"sum"``.

    Returns:
        The float32 cross-entropy, reduced as requested.

    Examples:
        >>> s = torch.tensor([[0.0, 0.0]])
        >>> p = torch.tensor([[0.5, 0.5]])
        >>> round(soft_cross_entropy(s, p).item(), 4)  # -log ½
        0.6931
    """
    student_log_probs = _student_log_probs(student_logits, target_probs, temperature, reduction)
    per_position = -(target_probs.float() * student_log_probs).sum(dim=-1)
    return _reduce(temperature**2 * per_position, reduction)


def logit_mse(
    student_logits: Tensor,
    target_logits: Tensor,
    reduction: str = "batchmean",
) -> Tensor:
    """Mean squared error between logits, averaged over classes at each position.

    ``"batchmean"`` therefore equals ``F.mse_loss(s, z)``. No temperature is involved.

    Args:
        student_logits: Student logits ``(..., C)``.
        target_logits: Target (teacher) logits ``(..., C)``.
        reduction: ``"none"``, ``"batchmean"`` or ``"sum"``.

    Returns:
        The float32 error, reduced as requested.

    Examples:
        >>> s = torch.tensor([[1.0, 3.0]])
        >>> z = torch.tensor([[0.0, 0.0]])
        >>> logit_mse(s, z).item()  # (1 + 9) / 2
        5.0
    """
    _check_reduction(reduction)
    _check_same_shape(student_logits, target_logits, "target_logits")
    per_position = (student_logits.float() - target_logits.float()).pow(2).mean(dim=-1)
    return _reduce(per_position, reduction)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 4.0,
    reduction: str = "batchmean",
) -> Tensor:
    """Hinton et al. (2015) distillation loss ``T² · KL(softmax(t / T) ‖ softmax(s / T))``.

    Gradients flow into ``teacher_logits`` if they require them; detach a frozen teacher's output.

    Args:
        student_logits: Student logits ``(..., C)``.
        teacher_logits: Teacher logits ``(..., C)``.
        temperature: Softmax temperature ``T > 0`` applied to both.
        reduction: ``"none"``, ``"batchmean"`` or ``"sum"``.

    Returns:
        The float32 loss, reduced as requested.

    Examples:
        >>> s = torch.tensor([[1.0, 2.0, 3.0]])
        >>> round(kd_loss(s, s).item(), 4)
        0.0
    """
    _check_temperature(temperature)
    _check_same_shape(student_logits, teacher_logits, "teacher_logits")
    target_probs = F.softmax(teacher_logits.float() / temperature, dim=-1)
    return kl_divergence(student_logits, target_probs, temperature, reduction)
