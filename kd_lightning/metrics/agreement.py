"""Per-teacher agreement statistics accumulated as counts, exact under DDP."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from kd_lightning.teachers.cache.topk import TopKLogits, expand_topk

CHUNK_TOKENS = 256
"""Positions of top-k teacher outputs that :meth:`TeacherAgreement.update` expands at once."""


class TeacherAgreement(Metric):
    """How each teacher relates to the labels, the student and the other teachers.

    ``update`` adds integer counts and float sums; ``compute`` divides once, after the sums were
    reduced across processes, so results on N processes equal those of one process on the same data.

    A batch may hold a subset of the teachers (``update``'s ``teacher_indices``, e.g. the teachers
    drawn for a training step): each statistic counts exactly the teachers that ran. Per-teacher
    values are over the positions where that teacher ran, pairwise ones over the positions where
    both did, and the ensemble's (``ensemble_jsd``, ``ensemble_accuracy``) over the batches where
    every teacher ran. A value with nothing counted is NaN.

    ``compute`` returns:

    * ``teacher_accuracy`` (K,): top-1 accuracy of each teacher.
    * ``teacher_ce`` (K,): each teacher's mean cross-entropy on the labels, −log p_k(label)
      (for a language model, the log of its perplexity).
    * ``student_agreement`` (K,): fraction of samples (or real tokens, see ``update``'s ``mask``)
      where student and teacher argmax agree.
    * ``student_kl`` (K,): mean KL(p_teacher ‖ p_student) at T = 1, the quantity KD drives down.
    * ``pairwise_agreement`` (K, K): top-1 agreement between teachers (diagonal 1).
    * ``disagreement``: mean over the measured teacher pairs of 1 − agreement (0 for one teacher).
    * ``fusion_weight`` (K,): mean fusion weight per teacher (NaN if weights were never given).
    * ``ensemble_jsd``: mean of H(p̄) − mean_k H(p_k), the diversity of the ensemble.
    * ``ensemble_accuracy``: accuracy of the mean-of-probabilities ensemble.
    * ``ensemble_ce``: its mean cross-entropy on the labels, −log(mean_k p_k(label)).
    * ``student_accuracy``: accuracy of the student, over every batch.

    Args:
        num_teachers: K.
        chunk_tokens: positions of top-k teacher outputs expanded at once (see :meth:`update`).

    Examples:
        >>> metric = TeacherAgreement(num_teachers=2)
        >>> student = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
        >>> teachers = torch.tensor([[[3.0, 0.0], [3.0, 0.0]], [[0.0, 3.0], [0.0, 3.0]]])
        >>> metric.update(student, teachers, torch.tensor([0, 1]))
        >>> metric.compute()["student_agreement"]
        tensor([0.5000, 0.5000])

        Then a batch where only teacher 1 ran: it alone gets two more samples.

        >>> metric.update(student, teachers[1:], torch.tensor([0, 1]), teacher_indices=[1])
        >>> metric.compute()["student_agreement"]
        tensor([0.5000, 0.5000])
        >>> metric.teacher_total.tolist(), metric.ensemble_total.item()
        ([2, 4], 2)
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    total: Tensor
    ensemble_total: Tensor
    teacher_total: Tensor
    pair_total: Tensor
    weight_total: Tensor
    student_correct: Tensor
    ensemble_correct: Tensor
    teacher_correct: Tensor
    student_agree: Tensor
    pairwise_agree: Tensor
    kl_sum: Tensor
    weight_sum: Tensor
    jsd_sum: Tensor
    teacher_ce_sum: Tensor
    ensemble_ce_sum: Tensor

    def __init__(
        self, num_teachers: int, chunk_tokens: int = CHUNK_TOKENS, **kwargs: object
    ) -> None:
        super().__init__(**kwargs)
        if num_teachers < 1:
            raise ValueError(f"num_teachers must be at least 1, got {num_teachers}")
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
        self.num_teachers = num_teachers
        self.chunk_tokens = chunk_tokens
        k = num_teachers
        counts = {
            "total": (),
            "ensemble_total": (),
            "teacher_total": (k,),
            "pair_total": (k, k),
            "weight_total": (k,),
            "student_correct": (),
            "ensemble_correct": (),
            "teacher_correct": (k,),
            "student_agree": (k,),
            "pairwise_agree": (k, k),
        }
        for name, shape in counts.items():
            self.add_state(name, torch.zeros(shape, dtype=torch.long), dist_reduce_fx="sum")
        sums = {
            "kl_sum": (k,),
            "weight_sum": (k,),
            "jsd_sum": (),
            "teacher_ce_sum": (k,),
            "ensemble_ce_sum": (),
        }
        for name, shape in sums.items():
            self.add_state(name, torch.zeros(shape, dtype=torch.float32), dist_reduce_fx="sum")

    def update(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | TopKLogits,
        labels: Tensor,
        weights: Tensor | None = None,
        mask: Tensor | None = None,
        teacher_indices: Tensor | Sequence[int] | None = None,
    ) -> None:
        """Add a batch: student ``(*batch, C)``, teachers ``(K', *batch, C)``, labels ``(*batch)``,
        weights ``(*batch, K')``, e.g. ``(B, C)`` or token-level ``(B, L, V)``.

        Teachers given as :class:`~kd_lightning.teachers.cache.topk.TopKLogits` (values and ids
        ``(K', *batch, k)``, e.g. a sequence cache's) count as their expansion
        (:func:`~kd_lightning.teachers.cache.topk.expand_topk`), made ``chunk_tokens`` real
        positions at a time: ``K' × chunk_tokens × C`` dense logits at most, never the batch's.

        ``teacher_indices`` ``(K',)``: which teachers the rows of ``teacher_logits`` (and the
        columns of ``weights``) are, distinct indices in ``[0, K)``; ``None`` means all ``K`` in
        order. ``mask`` ``(*batch)``, true at real positions (tokens), restricts every statistic
        to those; ``None`` counts every position, so every label must then be a class index
        (mask out padding labelled ``-100``).

        Examples:
            >>> from kd_lightning.teachers.cache.topk import compress_topk
            >>> teachers = torch.randn(2, 3, 4, 6)
            >>> student, labels = torch.randn(3, 4, 6), torch.randint(0, 6, (3, 4))
            >>> dense, sparse = TeacherAgreement(2), TeacherAgreement(2, chunk_tokens=5)
            >>> packed = compress_topk(teachers, k=2)
            >>> dense.update(student, expand_topk(packed), labels)
            >>> sparse.update(student, packed, labels)  # 12 positions in 3 chunks
            >>> torch.allclose(dense.compute()["student_kl"], sparse.compute()["student_kl"])
            True
        """
        shape = (
            torch.Size((*teacher_logits.values.shape[:-1], teacher_logits.num_classes))
            if isinstance(teacher_logits, TopKLogits)
            else teacher_logits.shape
        )
        ran = shape[0]
        if teacher_indices is None and ran != self.num_teachers:
            raise ValueError(
                f"expected teacher logits of shape ({self.num_teachers}, *{tuple(student_logits.shape)}), "
                f"got {tuple(shape)}; pass teacher_indices when only some teachers ran"
            )
        if shape[1:] != student_logits.shape:
            raise ValueError(
                f"expected teacher logits of shape (K', *{tuple(student_logits.shape)}), got "
                f"{tuple(shape)}"
            )
        if teacher_indices is not None and len(teacher_indices) != ran:
            raise ValueError(
                f"{len(teacher_indices)} teacher_indices for {ran} rows of teacher logits"
            )
        if mask is not None:
            if mask.shape != student_logits.shape[:-1]:
                raise ValueError(
                    f"mask of shape {tuple(mask.shape)} does not match logits "
                    f"{tuple(student_logits.shape)}"
                )
            mask = mask.bool()
        elif isinstance(teacher_logits, TopKLogits):  # every position, flattened for the chunks
            mask = student_logits.new_ones(student_logits.shape[:-1], dtype=torch.bool)
        if mask is not None:
            student_logits, labels = student_logits[mask], labels[mask]
            weights = None if weights is None else weights[mask]
        if teacher_indices is None:
            rows = torch.arange(ran, device=self.teacher_total.device)
        else:
            rows = torch.as_tensor(
                teacher_indices, dtype=torch.long, device=self.teacher_total.device
            )
        if not isinstance(teacher_logits, TopKLogits):
            dense = teacher_logits if mask is None else teacher_logits[:, mask]
            self._accumulate(student_logits, dense, labels, weights, rows)
            return
        values, indices = teacher_logits.values[:, mask], teacher_logits.indices[:, mask]
        tail, classes = teacher_logits.tail_logsumexp[:, mask], teacher_logits.num_classes
        for start in range(0, labels.numel(), self.chunk_tokens):
            part = slice(start, start + self.chunk_tokens)
            chunk = TopKLogits(values[:, part], indices[:, part], tail[:, part], classes)
            self._accumulate(
                student_logits[part],
                expand_topk(chunk),
                labels[part],
                None if weights is None else weights[part],
                rows,
            )

    def _accumulate(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        labels: Tensor,
        weights: Tensor | None,
        rows: Tensor,
    ) -> None:
        """Add the statistics of every position of student ``(*batch, C)`` and dense teachers
        ``(K', *batch, C)`` (the teachers ``rows``), labels ``(*batch)``, weights ``(*batch, K')``."""
        ran = teacher_logits.shape[0]
        student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
        student_top1 = student_logits.argmax(-1)
        teacher_top1 = teacher_logits.argmax(-1)
        log_q = torch.log_softmax(student_logits, -1)
        log_p = torch.log_softmax(teacher_logits, -1)
        p = log_p.exp()
        positions = labels.numel()

        self.total += positions
        self.student_correct += (student_top1 == labels).sum()
        pairs = (rows[:, None], rows[None])
        self.teacher_total[rows] += positions
        self.pair_total[pairs] += positions
        self.teacher_correct[rows] += (teacher_top1 == labels).flatten(1).sum(1)
        self.student_agree[rows] += (teacher_top1 == student_top1).flatten(1).sum(1)
        self.pairwise_agree[pairs] += (
            (teacher_top1[:, None] == teacher_top1[None]).flatten(2).sum(2)
        )
        self.kl_sum[rows] += (torch.xlogy(p, p) - p * log_q).sum(-1).flatten(1).sum(1)
        index = labels.unsqueeze(-1).expand(ran, *labels.shape, 1)
        label_log_p = log_p.gather(-1, index).squeeze(-1)  # (K', *batch): log p_k(label)
        self.teacher_ce_sum[rows] -= label_log_p.flatten(1).sum(1)
        if ran == self.num_teachers:  # the whole ensemble ran (the indices are distinct)
            mean_p = p.mean(0)
            self.ensemble_total += positions
            self.ensemble_correct += (mean_p.argmax(-1) == labels).sum()
            mean_label_log_p = torch.logsumexp(label_log_p, 0) - math.log(ran)
            self.ensemble_ce_sum -= mean_label_log_p.sum()
            entropy_of_mean = -torch.xlogy(mean_p, mean_p).sum(-1)
            mean_entropy = -torch.xlogy(p, p).sum(-1).mean(0)
            self.jsd_sum += (entropy_of_mean - mean_entropy).sum()
        if weights is not None:
            self.weight_total[rows] += positions
            self.weight_sum[rows] += weights.float().reshape(-1, ran).sum(0)

    def compute(self) -> dict[str, Tensor]:
        """Divide the accumulated counts; see the class docstring for the keys."""
        per_teacher = self.teacher_total.float()
        pairwise = self.pairwise_agree.float() / self.pair_total.float()
        k = self.num_teachers
        off_diagonal = ~torch.eye(k, dtype=torch.bool, device=pairwise.device)
        disagreement = (1 - pairwise[off_diagonal]).nanmean() if k > 1 else pairwise.new_zeros(())
        ensemble = self.ensemble_total.float()
        return {
            "teacher_accuracy": self.teacher_correct.float() / per_teacher,
            "teacher_ce": self.teacher_ce_sum / per_teacher,
            "student_agreement": self.student_agree.float() / per_teacher,
            "student_kl": self.kl_sum / per_teacher,
            "pairwise_agreement": pairwise,
            "disagreement": disagreement,
            "fusion_weight": self.weight_sum / self.weight_total.float(),
            "ensemble_jsd": self.jsd_sum / ensemble,
            "ensemble_accuracy": self.ensemble_correct.float() / ensemble,
            "ensemble_ce": self.ensemble_ce_sum / ensemble,
            "student_accuracy": self.student_correct.float() / self.total.clamp_min(1).float(),
        }


PER_TEACHER = (
    "teacher_accuracy",
    "teacher_ce",
    "student_agreement",
    "student_kl",
    "fusion_weight",
)


def with_teacher_dims(values: dict[str, Tensor], num_teachers: int) -> dict[str, Tensor]:
    """Restore the ``(K,)`` and ``(K, K)`` shapes of :meth:`TeacherAgreement.compute` results.

    torchmetrics squeezes one-element results, so with one teacher the per-teacher values come
    back as scalars.

    Examples:
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
