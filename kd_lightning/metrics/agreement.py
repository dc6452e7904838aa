"""Per-teacher agreement statistics accumulated as counts, exact under DDP."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class TeacherAgreement(Metric):
    """How each teacher relates to the labels, the student and the other teachers.

    ``update`` adds integer counts and float sums; ``compute`` divides once, after the sums were
    reduced across processes, so results on N processes equal those of one process on the same data.

    ``compute`` returns:

    * ``teacher_accuracy`` (K,): top-1 accuracy of each teacher.
    * ``student_agreement`` (K,): fraction of samples (or real tokens, see ``update``'s ``mask``)
      where student and teacher argmax agree.
    * ``student_kl`` (K,): mean KL(p_teacher ‖ p_student) at T = 1, the quantity KD drives down.
    * ``pairwise_agreement`` (K, K): top-1 agreement between teachers (diagonal 1).
    * ``disagreement``: mean over teacher pairs of 1 − agreement (0 for one teacher).
    * ``fusion_weight`` (K,): mean fusion weight per teacher (NaN if weights were never given).
    * ``ensemble_jsd``: mean of H(p̄) − mean_k H(p_k), the diversity of the ensemble.
    * ``ensemble_accuracy``: accuracy of the mean-of-probabilities ensemble.
    * ``student_accuracy``: accuracy of the student.

    Args:
        num_teachers: K.

    Example:
        >>> metric = TeacherAgreement(num_teachers=2)
        >>> student = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
        >>> teachers = torch.tensor([[[3.0, 0.0], [3.0, 0.0]], [[0.0, 3.0], [0.0, 3.0]]])
        >>> metric.update(student, teachers, torch.tensor([0, 1]))
        >>> metric.compute()["student_agreement"]
        tensor([0.5000, 0.5000])
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    total: Tensor
    weighted_total: Tensor
    student_correct: Tensor
    ensemble_correct: Tensor
    teacher_correct: Tensor
    student_agree: Tensor
    pairwise_agree: Tensor
    kl_sum: Tensor
    weight_sum: Tensor
    jsd_sum: Tensor

    def __init__(self, num_teachers: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        if num_teachers < 1:
            raise ValueError(f"num_teachers must be at least 1, got {num_teachers}")
        self.num_teachers = num_teachers
        k = num_teachers
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("weighted_total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("student_correct", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("ensemble_correct", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("teacher_correct", torch.zeros(k, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("student_agree", torch.zeros(k, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("pairwise_agree", torch.zeros(k, k, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("kl_sum", torch.zeros(k, dtype=torch.float32), dist_reduce_fx="sum")
        self.add_state("weight_sum", torch.zeros(k, dtype=torch.float32), dist_reduce_fx="sum")
        self.add_state("jsd_sum", torch.tensor(0.0, dtype=torch.float32), dist_reduce_fx="sum")

    def update(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        labels: Tensor,
        weights: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> None:
        """Add a batch: student ``(*batch, C)``, teachers ``(K, *batch, C)``, labels ``(*batch)``,
        weights ``(*batch, K)``, e.g. ``(B, C)`` or token-level ``(B, L, V)``.

        ``mask`` ``(*batch)``, true at real positions (tokens), restricts every statistic to
        those; ``None`` counts every position.
        """
        if (
            teacher_logits.shape[0] != self.num_teachers
            or teacher_logits.shape[1:] != student_logits.shape
        ):
            raise ValueError(
                f"expected teacher logits of shape ({self.num_teachers}, *{tuple(student_logits.shape)}), "
                f"got {tuple(teacher_logits.shape)}"
            )
        if mask is not None:
            if mask.shape != student_logits.shape[:-1]:
                raise ValueError(
                    f"mask of shape {tuple(mask.shape)} does not match logits "
                    f"{tuple(student_logits.shape)}"
                )
            mask = mask.bool()
            student_logits, teacher_logits = student_logits[mask], teacher_logits[:, mask]
            labels = labels[mask]
            weights = None if weights is None else weights[mask]
        student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
        student_top1 = student_logits.argmax(-1)
        teacher_top1 = teacher_logits.argmax(-1)
        log_q = torch.log_softmax(student_logits, -1)
        log_p = torch.log_softmax(teacher_logits, -1)
        p = log_p.exp()
        mean_p = p.mean(0)

        self.total += labels.numel()
        self.student_correct += (student_top1 == labels).sum()
        self.ensemble_correct += (mean_p.argmax(-1) == labels).sum()
        self.teacher_correct += (teacher_top1 == labels).flatten(1).sum(1)
        self.student_agree += (teacher_top1 == student_top1).flatten(1).sum(1)
        self.pairwise_agree += (teacher_top1[:, None] == teacher_top1[None]).flatten(2).sum(2)
        self.kl_sum += (torch.xlogy(p, p) - p * log_q).sum(-1).flatten(1).sum(1)
        entropy_of_mean = -torch.xlogy(mean_p, mean_p).sum(-1)
        mean_entropy = -torch.xlogy(p, p).sum(-1).mean(0)
        self.jsd_sum += (entropy_of_mean - mean_entropy).sum()
        if weights is not None:
            self.weighted_total += labels.numel()
            self.weight_sum += weights.float().reshape(-1, self.num_teachers).sum(0)

    def compute(self) -> dict[str, Tensor]:
        """Divide the accumulated counts; see the class docstring for the keys."""
        total = self.total.clamp_min(1).float()
        k = self.num_teachers
        pairwise = self.pairwise_agree.float() / total
        off_diagonal = ~torch.eye(k, dtype=torch.bool, device=pairwise.device)
        disagreement = (1 - pairwise[off_diagonal]).mean() if k > 1 else pairwise.new_zeros(())
        return {
            "teacher_accuracy": self.teacher_correct.float() / total,
            "student_agreement": self.student_agree.float() / total,
            "student_kl": self.kl_sum / total,
            "pairwise_agreement": pairwise,
            "disagreement": disagreement,
            "fusion_weight": self.weight_sum / self.weighted_total.float(),
            "ensemble_jsd": self.jsd_sum / total,
            "ensemble_accuracy": self.ensemble_correct.float() / total,
            "student_accuracy": self.student_correct.float() / total,
        }


PER_TEACHER = ("teacher_accuracy", "student_agreement", "student_kl", "fusion_weight")


def with_teacher_dims(values: dict[str, Tensor], num_teachers: int) -> dict[str, Tensor]:
    """Restore the ``(K,)`` and ``(K, K)`` shapes of :meth:`TeacherAgreement.compute` results.

    torchmetrics squeezes one-element results, so with one teacher the per-teacher values come
    back as scalars.

    Example:
        >>> metric = TeacherAgreement(num_teachers=1)
        >>> metric.update(torch.eye(2), torch.eye(2)[None], torch.tensor([0, 1]))
        >>> with_teacher_dims(metric.compute(), 1)["pairwise_agreement"].shape
        torch.Size([1, 1])
    """
    shaped = dict(values)
    for key in PER_TEACHER:
        shaped[key] = values[key].reshape(num_teachers)
    shaped["pairwise_agreement"] = values["pairwise_agreement"].reshape(num_teachers, num_teachers)
    return shaped
