"""Objectives of the progressive and teacher-free regimes: ProKT's two steps and Tf-KD's virtual
teacher.

Both follow ``methods.md`` (section B). Every function computes in float32 and returns the batch
mean (``batchmean``: never divided by the number of classes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.functional.divergences import kl_divergence


def _kl_to_detached(logits: Tensor, target_logits: Tensor, temperature: float) -> Tensor:
    """``T²·KL(sg softmax(t / T) ‖ softmax(z / T))``: no gradient reaches ``target_logits``."""
    target = torch.softmax(target_logits.detach().float() / temperature, -1)
    return kl_divergence(logits, target, temperature)


def prokt_teacher_loss(
    teacher_logits: Tensor,
    student_logits: Tensor,
    labels: Tensor,
    constraint: float = 0.4,
    temperature: float = 1.0,
) -> Tensor:
    """ProKT's teacher objective ``(1 − λ)·CE(y, p_T) + λ·T²·KL(sg p_S ‖ p_T)``.

    The teacher learns the task while being held near the student: the KL term pulls the teacher
    towards the student's current prediction, which is detached here (no gradient reaches the
    student through this loss). Shi et al., "Follow Your Path: a Progressive Method for Knowledge
    Distillation" (ECML-PKDD 2021; arXiv:2107.09305, "Learning from deep model via exploring local
    targets"), with their defaults λ = 0.4, T = 1.

    Args:
        teacher_logits: the teacher's logits ``(B, C)``, with gradient.
        student_logits: the student's logits ``(B, C)``; detached inside.
        labels: class indices ``(B,)``.
        constraint: λ, the weight of the KL constraint towards the student.
        temperature: T of both softmaxes; the KL term carries T².

    Examples:
        >>> z = torch.zeros(2, 3)
        >>> round(prokt_teacher_loss(z, z, torch.tensor([0, 1])).item(), 4)  # 0.6 · ln 3
        0.6592
    """
    if not 0.0 <= constraint <= 1.0:
        raise ValueError(f"constraint (λ) must lie in [0, 1], got {constraint}")
    hard = F.cross_entropy(teacher_logits.float(), labels)
    constraint_term = _kl_to_detached(teacher_logits, student_logits, temperature)
    return (1.0 - constraint) * hard + constraint * constraint_term


def prokt_student_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0
) -> Tensor:
    """ProKT's student objective ``T²·KL(sg p_T ‖ p_S)``: the refreshed teacher alone, no labels.

    The teacher logits are detached inside, so no gradient reaches the teacher.

    Examples:
        >>> import math
        >>> s, t = torch.zeros(1, 2), torch.tensor([[0.0, math.log(3.0)]])
        >>> round(prokt_student_loss(s, t).item(), 4)  # KL([1/4, 3/4] ‖ [1/2, 1/2])
        0.1308
    """
    return _kl_to_detached(student_logits, teacher_logits, temperature)


def virtual_teacher_probs(labels: Tensor, num_classes: int, correct_prob: float = 0.99) -> Tensor:
    """Tf-KD's virtual teacher ``p_d(k) = a`` if ``k = y`` else ``(1 − a)/(C − 1)``.

    Yuan et al., "Revisiting Knowledge Distillation via Label Smoothing Regularization" (CVPR
    2020), section 4, with ``a = 0.99``. Returns ``(*labels.shape, C)`` float32 probabilities.

    Examples:
        >>> [round(p, 4) for p in virtual_teacher_probs(torch.tensor([1]), 3, 0.8)[0].tolist()]
        [0.1, 0.8, 0.1]
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if not 0.0 < correct_prob < 1.0:
        raise ValueError(f"correct_prob (a) must lie in (0, 1), got {correct_prob}")
    other = (1.0 - correct_prob) / (num_classes - 1)
    probs = torch.full((*labels.shape, num_classes), other, device=labels.device)
    return probs.scatter(-1, labels.unsqueeze(-1), correct_prob)


def virtual_teacher_logits(labels: Tensor, num_classes: int, correct_prob: float = 0.99) -> Tensor:
    """The virtual teacher as logits: ``log p_d``, so ``softmax(log p_d / T)`` is the paper's
    softened ``p_d^τ`` (``∝ p_d^{1/T}``) and any KD loss can take it as a teacher.

    Examples:
        >>> logits = virtual_teacher_logits(torch.tensor([0]), 2, 0.75)
        >>> [round(p, 4) for p in torch.softmax(logits, -1)[0].tolist()]
        [0.75, 0.25]
    """
    return virtual_teacher_probs(labels, num_classes, correct_prob).log()


def tfkd_virtual_loss(
    student_logits: Tensor,
    labels: Tensor,
    alpha: float,
    temperature: float,
    correct_prob: float = 0.99,
) -> Tensor:
    """The paper's Tf-KD virtual objective ``(1 − α)·CE(y, q) + α·T²·KL(p_d^τ ‖ q^τ)``.

    ``p_d^τ = softmax(log p_d / T)``. The authors' code (``yuanli2333/Teacher-free-Knowledge-
    Distillation``) differs: it softens by ``softmax(p_d / T)`` (a softmax over probabilities,
    nearly uniform for large T), omits T², averages the KL over classes (``KLDivLoss``'s default)
    and multiplies the term by a hand-tuned "multiplier" (50 to 100) to compensate.

    Examples:
        >>> import math
        >>> s = torch.zeros(4, 10)
        >>> loss = tfkd_virtual_loss(s, torch.arange(4), alpha=0.0, temperature=4.0)
        >>> round(loss.item(), 4) == round(math.log(10), 4)
        True
    """
    num_classes = student_logits.shape[-1]
    teacher = virtual_teacher_logits(labels, num_classes, correct_prob)
    target = torch.softmax(teacher / temperature, -1)
    hard = F.cross_entropy(student_logits.float(), labels)
    return (1.0 - alpha) * hard + alpha * kl_divergence(student_logits, target, temperature)
