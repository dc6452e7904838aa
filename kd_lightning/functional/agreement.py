"""How much teachers agree with each other, with the student and with the labels.

Pure-torch ratios over one batch. Teacher logits are stacked as ``(K, *batch, C)`` (usually
``(K, B, C)``), student logits are ``(*batch, C)`` and labels are integer class indices
``(*batch)``.
Predictions are top-1 (argmax over the last dimension). Every result is float32.

These are per-batch ratios: to aggregate exactly over batches or DDP ranks, accumulate counts
(ratio x number of positions) rather than averaging ratios.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_JSD_REDUCTIONS: tuple[str, ...] = ("none", "mean", "sum")


def _check_teacher_logits(teacher_logits: Tensor) -> None:
    if teacher_logits.ndim < 3:
        raise ValueError(
            "teacher_logits must have shape (K, *batch, C) with at least 3 dims, got shape "
            f"{tuple(teacher_logits.shape)}"
        )


def _check_labels(labels: Tensor, batch_shape: torch.Size) -> None:
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must hold integer class indices, got dtype {labels.dtype}")
    if labels.shape != batch_shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal the batch shape {tuple(batch_shape)}"
        )


def top1_agreement(logits_a: Tensor, logits_b: Tensor) -> Tensor:
    """Fraction of positions where two models have the same top-1 prediction.

    Args:
        logits_a: Logits ``(..., C)``.
        logits_b: Logits of the same shape.

    Returns:
        A float32 scalar in ``[0, 1]``.

    Examples:
        >>> a = torch.tensor([[2.0, 1.0], [0.0, 1.0]])
        >>> b = torch.tensor([[3.0, 0.0], [1.0, 0.0]])
        >>> top1_agreement(a, b).item()
        0.5
    """
    if logits_a.shape != logits_b.shape:
        raise ValueError(
            f"logits_a shape {tuple(logits_a.shape)} and logits_b shape "
            f"{tuple(logits_b.shape)} must match"
        )
    return (logits_a.argmax(dim=-1) == logits_b.argmax(dim=-1)).float().mean()


def student_teacher_agreement(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Top-1 agreement between the student and each teacher.

    Args:
        student_logits: Student logits ``(*batch, C)``.
        teacher_logits: Stacked teacher logits ``(K, *batch, C)``.

    Returns:
        Float32 ratios ``(K,)``.

    Examples:
        >>> s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> t = torch.stack([s, -s])
        >>> student_teacher_agreement(s, t).tolist()
        [1.0, 0.0]
    """
    _check_teacher_logits(teacher_logits)
    if student_logits.shape != teacher_logits.shape[1:]:
        raise ValueError(
            f"student_logits shape {tuple(student_logits.shape)} must equal teacher_logits shape "
            f"{tuple(teacher_logits.shape)} without its leading K"
        )
    agree = teacher_logits.argmax(dim=-1) == student_logits.argmax(dim=-1)
    return agree.flatten(start_dim=1).float().mean(dim=1)


def pairwise_agreement(teacher_logits: Tensor) -> Tensor:
    """Top-1 agreement between every pair of teachers.

    Args:
        teacher_logits: Stacked teacher logits ``(K, *batch, C)``.

    Returns:
        A symmetric float32 matrix ``(K, K)`` with ones on the diagonal.

    Examples:
        >>> t = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[2.0, 0.0]]])
        >>> pairwise_agreement(t).tolist()
        [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]
    """
    _check_teacher_logits(teacher_logits)
    predictions = teacher_logits.argmax(dim=-1).flatten(start_dim=1)
    return (predictions[:, None, :] == predictions[None, :, :]).float().mean(dim=-1)


def per_teacher_accuracy(teacher_logits: Tensor, labels: Tensor) -> Tensor:
    """Top-1 accuracy of each teacher.

    Args:
        teacher_logits: Stacked teacher logits ``(K, *batch, C)``.
        labels: Integer class indices ``(*batch)``.

    Returns:
        Float32 accuracies ``(K,)``.

    Examples:
        >>> t = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]])
        >>> per_teacher_accuracy(t, torch.tensor([0, 0])).tolist()
        [1.0, 0.5]
    """
    _check_teacher_logits(teacher_logits)
    _check_labels(labels, teacher_logits.shape[1:-1])
    correct = teacher_logits.argmax(dim=-1) == labels
    return correct.flatten(start_dim=1).float().mean(dim=1)


def disagreement(teacher_logits: Tensor) -> Tensor:
    """Mean pairwise top-1 disagreement ``D = 2/(K(K-1)) Σ_{k<l} mean 1[argmax z_k ≠ argmax z_l]``.

    Args:
        teacher_logits: Stacked teacher logits ``(K, *batch, C)``.

    Returns:
        A float32 scalar in ``[0, 1]``; ``0`` when ``K = 1``.

    Examples:
        >>> t = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[2.0, 0.0]]])
        >>> round(disagreement(t).item(), 4)  # pairs (0,1), (1,2) disagree: 2 of 3
        0.6667
    """
    _check_teacher_logits(teacher_logits)
    num_teachers = teacher_logits.shape[0]
    if num_teachers == 1:
        return torch.zeros((), dtype=torch.float32, device=teacher_logits.device)
    # The diagonal of (1 - agreement) is zero and the matrix is symmetric, so its full sum counts
    # every unordered pair twice.
    pair_disagreement = 1 - pairwise_agreement(teacher_logits)
    return pair_disagreement.sum() / (num_teachers * (num_teachers - 1))


def ensemble_jsd(
    teacher_logits: Tensor,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """Generalised Jensen-Shannon divergence of the teachers, ``H(p̄) - (1/K) Σ_k H(p_k)``.

    ``p_k = softmax(z_k / T)`` and ``p̄`` is their mean. Zero when all teachers agree exactly,
    at most ``log K``.

    Args:
        teacher_logits: Stacked teacher logits ``(K, *batch, C)``.
        temperature: Softmax temperature ``T > 0``.
        reduction: ``"none"`` (shape ``(*batch)``), ``"mean"`` or ``"sum"`` over positions.

    Returns:
        Non-negative float32 divergence (nats), reduced as requested.

    Examples:
        >>> t = torch.tensor([[[0.0, -1e4]], [[-1e4, 0.0]]])  # two confident, opposite teachers
        >>> round(ensemble_jsd(t).item(), 4)  # H(½, ½) - 0 = log 2
        0.6931
    """
    if reduction not in _JSD_REDUCTIONS:
        raise ValueError(f"reduction must be one of {_JSD_REDUCTIONS}, got {reduction!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check_teacher_logits(teacher_logits)
    probs = F.softmax(teacher_logits.float() / temperature, dim=-1)
    entropy_of_mean = torch.special.entr(probs.mean(dim=0)).sum(dim=-1)
    mean_entropy = torch.special.entr(probs).sum(dim=-1).mean(dim=0)
    # Rounding can push a true zero slightly below it.
    per_position = (entropy_of_mean - mean_entropy).clamp_min(0)
    if reduction == "none":
        return per_position
    if reduction == "sum":
        return per_position.sum()
    return per_position.mean()
