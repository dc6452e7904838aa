"""The KD term from K teachers' top-k logits and tail mass, never expanded to ``(K, *batch, V)``.

A teacher cached as its top-k logits ``v_i`` (ids ``S``) and the log-sum-exp ``τ`` of its other
``m = V − k`` logits stands, once expanded (:func:`~kd_lightning.teachers.cache.topk.expand_topk`),
for the logits ``v_i`` on ``S`` and ``f = τ − log m`` at every other id. Its softmax at temperature
``T`` is ``p_i = exp(v_i / T − Z)`` on ``S`` and one constant ``c = exp(f / T − Z)`` at the other
``m`` ids, with ``Z = logaddexp(logsumexp_i(v_i / T), f / T + log m)``. So a fused target
``t = Σ_k w_k p_k`` is the floor ``Σ_k w_k c_k`` plus K·k spikes ``w_k (p_i − c_k)``, scattered
into one ``(*batch, V)`` tensor, the size of the student's logits (never K of them); the KL or
soft cross-entropy to it then costs what the student's log-softmax costs. One divergence per
teacher ("loss" aggregation) needs no target at all: for any ``g`` over the vocabulary,
``Σ_v p(v) g(v) = Σ_i (p_i − c) g(i) + c Σ_v g(v)``, so with ``g`` the student's tempered
log-softmax the cross term costs ``O(k)`` per teacher besides one sum over ``V``, and a teacher's
entropy is ``−Σ_i p_i log p_i − m c log c``.

The tail can instead take the student's shape (``tail="student"``): each teacher keeps its tail
mass ``r = m c`` but spreads it like the student's own (detached) tempered probabilities ``q``
there, ``p(v) = r q(v) / Q`` with ``Q`` the student's mass outside the teacher's top k. The KL of
one such teacher to the student is then the KL between the two distributions with every id
outside the teacher's top k merged into one ("other"): it moves the student's tail mass towards
``r``, never its shape towards a flat one. It builds each teacher's tail over ``V``, chunk by chunk.

Exact (equal to the dense expansion's loss and gradients up to float32 rounding) for the
divergences in :data:`SPARSE_DIVERGENCES` and the rules in :data:`SPARSE_RULES`, whose weights
read the teachers only through their shape or through their entropies or cross-entropies at
temperature 1; :class:`~kd_lightning.DistillationLoss` takes this path when
:attr:`~kd_lightning.DistillationLoss.accepts_topk` says so, and the dense one otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.fusion import (
    ConfidenceAware,
    EntropyWeighted,
    FusionContext,
    FusionRule,
    LearnedWeights,
    MeanProbabilities,
    StaticWeights,
)
from kd_lightning.teachers.cache.topk import TopKLogits

SPARSE_DIVERGENCES = ("kl", "soft_ce")
"""The divergences linear in the target's probabilities, up to the target's own entropy."""
SPARSE_RULES = (MeanProbabilities, StaticWeights, LearnedWeights, EntropyWeighted, ConfidenceAware)
"""The rules (these classes exactly, not subclasses) whose weights the sparse path computes."""
_TINY = torch.finfo(torch.float32).tiny
TAIL_CHUNK_ELEMENTS = 2**22
"""Student-shaped tails are built a chunk of positions at a time, ``(chunk, K, V)`` holding
about this many elements (16 MiB in float32)."""


def exact_rule(rule: FusionRule) -> bool:
    """Whether the sparse path computes ``rule``'s weights and target exactly.

    Examples:
        >>> from kd_lightning.fusion import MajorityVote
        >>> exact_rule(MeanProbabilities()), exact_rule(MajorityVote())
        (True, False)
    """
    return type(rule) in SPARSE_RULES


@dataclass(frozen=True)
class TopKSoftmax:
    """K teachers' softmax at one temperature over ``V`` ids, as their dense expansion gives it,
    positions first.

    Attributes:
        indices: ``(N, K, k)`` int64, each teacher's top-k ids at each of ``N`` positions.
        probs: ``(N, K, k)`` float32 probabilities at those ids.
        shifted: ``(N, K, k)`` the tempered logits there minus each row's largest.
        log_norm: ``(N, K)`` the log-normaliser relative to that largest logit.
        log_rest: ``(N, K)`` log-probability of each of the other ids (``-inf`` when ``k = V``).
        rest: ``m = V − k``, how many other ids each row has.

    Examples:
        >>> logits = torch.tensor([[[3.0, 1.0, 0.5, 0.5]]])  # K = 1, N = 1, V = 4
        >>> topk = TopKLogits(logits[..., :2], torch.tensor([[[0, 1]]]),
        ...                   torch.logsumexp(logits[..., 2:], -1), num_classes=4)
        >>> soft = TopKSoftmax.of(topk, temperature=2.0)
        >>> dense = torch.softmax(logits / 2.0, -1)
        >>> torch.allclose(soft.probs, dense[..., :2]), torch.allclose(
        ...     soft.log_rest.exp(), dense[..., 2])
        (True, True)
    """

    indices: Tensor
    probs: Tensor
    shifted: Tensor
    log_norm: Tensor
    log_rest: Tensor
    rest: int

    @classmethod
    def of(cls, topk: TopKLogits, temperature: float) -> TopKSoftmax:
        """The softmax at ``temperature`` of the teachers ``topk`` (values ``(K, N, k)``; a
        positions-first memory layout, as a sequence cache reads them, is used without a copy)."""
        top = (topk.values.float() / temperature).permute(1, 0, 2).contiguous()
        rest = topk.num_classes - top.shape[-1]
        peak = top.amax(-1, keepdim=True)
        top = top - peak
        terms = top.exp()
        # Relative to the largest logit, Z = log1p(the other terms), summed in float64 so that
        # they do not round against that logit's 1: a sharp teacher's log p at its top id, about
        # -Σ(others), keeps its relative precision (logits minus a logsumexp would not).
        others = (terms.sum(-1, dtype=torch.float64) - 1.0).float()
        if rest:
            fill = (topk.tail_logsumexp.float().T - math.log(rest)) / temperature - peak[..., 0]
            others = others + rest * fill.exp()
        log_norm = others.log1p()
        return cls(
            indices=topk.indices.long().permute(1, 0, 2).contiguous(),
            probs=terms / (1.0 + others).unsqueeze(-1),
            shifted=top,
            log_norm=log_norm,
            log_rest=fill - log_norm if rest else torch.full_like(log_norm, -math.inf),
            rest=rest,
        )

    def log_top(self) -> Tensor:
        """The log-probabilities ``(N, K, k)`` at the top-k ids."""
        return self.shifted - self.log_norm.unsqueeze(-1)

    def tail_mass(self) -> Tensor:
        """``r = m c``, each teacher's mass beyond its top k at each position, ``(N, K)``."""
        return self.rest * self.log_rest.exp()

    def neg_entropy_top(self) -> Tensor:
        """``Σ_i p_i log p_i`` over each teacher's top-k ids at each position, ``(N, K)``."""
        return torch.where(self.probs > 0, self.probs * self.log_top(), 0.0).sum(-1)

    def neg_entropy(self) -> Tensor:
        """``Σ_v p log p`` of each teacher at each position, ``(N, K)``."""
        top = self.neg_entropy_top()
        if not self.rest:
            return top
        rest = self.log_rest.exp()
        return top + self.rest * torch.where(rest > 0, rest * self.log_rest, 0.0)

    def log_prob(self, labels: Tensor) -> Tensor:
        """``log p(label)`` of each teacher at each position, ``(N, K)``, for labels ``(N,)``."""
        hits = self.indices == labels[:, None, None]
        at_hit = self.shifted.gather(-1, hits.to(torch.uint8).argmax(-1, keepdim=True))
        return torch.where(hits.any(-1), at_hit.squeeze(-1) - self.log_norm, self.log_rest)

    def cross(self, log_q: Tensor) -> Tensor:
        """``Σ_v p(v) log_q(v)`` of each teacher at each position, ``(N, K)``, for ``log_q``
        ``(N, V)``: ``O(k)`` per teacher besides one sum of ``log_q`` over ``V``."""
        positions = len(self.indices)
        at_top = log_q.gather(1, self.indices.view(positions, -1)).view(self.indices.shape)
        rest = self.log_rest.exp()
        spikes = (self.probs - rest.unsqueeze(-1)) * at_top
        return spikes.sum(-1) + rest * log_q.sum(-1, keepdim=True)

    def mixture(self, weights: Tensor, num_classes: int) -> Tensor:
        """The mixture ``Σ_k w_k p_k`` ``(N, V)`` for weights ``(N, K)`` summing to one: its
        floor ``Σ_k w_k c_k`` with each teacher's top-k spikes ``w_k (p_i − c_k)`` added."""
        positions = len(self.indices)
        rest = self.log_rest.exp() * weights
        spikes = (self.probs * weights.unsqueeze(-1)).sub_(rest.unsqueeze(-1))
        floor = rest.sum(-1, keepdim=True).expand(positions, num_classes)
        return floor.scatter_add(1, self.indices.view(positions, -1), spikes.view(positions, -1))


def student_shaped(teachers: TopKSoftmax, log_q: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """The mixture ``Σ_k w_k p_k`` ``(N, V)`` and each teacher's ``Σ_v p_k log p_k`` ``(N, K)``
    when each teacher's tail mass ``r_k`` is spread like the student's probabilities beyond the
    teacher's top k: ``p_k(v) = r_k q(v) / Q_k`` there.

    Args:
        teachers: The teachers' softmax at the loss's temperature.
        log_q: The student's log-probabilities ``(N, V)`` at that temperature; read detached.
        weights: The weights ``(N, K)`` of the mixture (with their gradient, if any: then the
            teachers' normalised tails, ``(N, K, V)``, are kept for backward).

    Examples:
        >>> logits = torch.tensor([[[2.0, 1.0, 0.0, 0.0]]])  # K = 1, N = 1, V = 4, k = 1
        >>> topk = TopKLogits(logits[..., :1], torch.tensor([[[0]]]),
        ...                   torch.logsumexp(logits[..., 1:], -1), num_classes=4)
        >>> log_q = torch.tensor([[0.1, 0.6, 0.2, 0.1]]).log()
        >>> mixture, _ = student_shaped(TopKSoftmax.of(topk, 1.0), log_q, torch.ones(1, 1))
        >>> p = torch.softmax(logits[0, 0], -1)  # the tail 1 − p[0] goes 6 : 2 : 1 to ids 1, 2, 3
        >>> torch.allclose(mixture[0], torch.cat([p[:1], (1 - p[0]) * torch.tensor([6, 2, 1]) / 9]))
        True
    """
    log_q = log_q.detach()
    positions, num_classes = log_q.shape
    tails = teachers.tail_mass()
    neg_entropy = teachers.neg_entropy_top()
    if not teachers.rest:
        mixture = torch.zeros_like(log_q)
    else:
        scale = weights * tails  # w_k r_k
        num_teachers = tails.shape[-1]
        chunk = max(1, TAIL_CHUNK_ELEMENTS // (num_teachers * num_classes))
        parts, tail_neg_entropy = [], []
        for start in range(0, positions, chunk):
            rows = slice(start, start + chunk)
            beyond = log_q[rows].unsqueeze(1).expand(-1, num_teachers, -1)
            beyond = beyond.scatter(2, teachers.indices[rows], -math.inf)
            # z = q / e^peak beyond teacher k's top k, 0 on it: Q_k = e^peak Σ z, u_k = z / Σ z
            peak = beyond.amax(-1, keepdim=True)
            z = beyond.sub_(peak).exp_()
            total = z.sum(-1)
            # Σ u log u = Σ z log q / Σ z − peak − log Σ z
            cross = torch.einsum("nkv,nv->nk", z, log_q[rows])
            tail_neg_entropy.append(cross / total - peak.squeeze(-1) - total.log())
            parts.append(torch.einsum("nk,nkv->nv", scale[rows] / total, z))
        mixture = torch.cat(parts)
        # Σ over the tail of r u log(r u) = r log r + r Σ u log u
        neg_entropy = neg_entropy + torch.xlogy(tails, tails)
        neg_entropy = neg_entropy + tails * torch.cat(tail_neg_entropy)
    spikes = teachers.probs * weights.unsqueeze(-1)
    mixture = mixture.scatter_add(
        1, teachers.indices.view(positions, -1), spikes.view(positions, -1)
    )
    return mixture, neg_entropy


def fusion_weights(
    rule: FusionRule, topk: TopKLogits, context: FusionContext, temperature: float
) -> Tensor:
    """The weights ``(N, K)`` that ``rule`` (one of :data:`SPARSE_RULES`) gives the dense
    expansion of ``topk`` (values ``(K, N, k)``), from the top-k outputs alone.

    Examples:
        >>> topk = TopKLogits(torch.randn(3, 5, 2), torch.tensor([0, 1]).expand(3, 5, 2),
        ...                   torch.zeros(3, 5), num_classes=4)
        >>> fusion_weights(MeanProbabilities(), topk, FusionContext(), 1.0).shape
        torch.Size([5, 3])
    """
    if isinstance(rule, EntropyWeighted | ConfidenceAware):
        at_one = TopKSoftmax.of(topk, 1.0)
        if isinstance(rule, EntropyWeighted):
            return rule.from_entropies(-at_one.neg_entropy())
        assert context.labels is not None  # the loss passes its labels
        return rule.from_cross_entropies(-at_one.log_prob(context.labels))
    return rule.weights(topk.values, context)  # the other rules read only the shape


def soft_term(
    student: Tensor,
    teachers: TopKSoftmax,
    weights: Tensor,
    divergence: str,
    aggregation: str,
    temperature: float,
    tail: str = "uniform",
) -> Tensor:
    """The KD term at each position, ``(N,)``, as :class:`~kd_lightning.DistillationLoss`
    computes it from the dense expansion of ``teachers`` (their softmax at ``temperature``), or
    with each teacher's tail shaped like the student's (``tail="student"``, :func:`student_shaped`).

    Args:
        student: Float32 student logits ``(N, V)``.
        teachers: The teachers' softmax at ``temperature``.
        weights: The fusion weights ``(N, K)``.
        divergence: ``"kl"`` or ``"soft_ce"``.
        aggregation: ``"target"`` (one divergence to the weighted mixture) or ``"loss"`` (the
            weighted sum of each teacher's divergence).
        temperature: ``T``; the term carries ``T²``.
        tail: ``"uniform"`` (each teacher's mass beyond its top k spread evenly) or
            ``"student"`` (spread like the student's tempered probabilities there).

    Examples:
        >>> from kd_lightning.functional import kl_divergence
        >>> logits, student = torch.randn(2, 3, 6), torch.randn(3, 6)
        >>> topk = TopKLogits(logits, torch.arange(6).expand(2, 3, 6), torch.full((2, 3), -math.inf), 6)
        >>> weights = torch.full((3, 2), 0.5)
        >>> sparse = soft_term(student, TopKSoftmax.of(topk, 2.0), weights, "kl", "target", 2.0)
        >>> target = torch.softmax(logits / 2.0, -1).mean(0)
        >>> torch.allclose(sparse, kl_divergence(student, target, 2.0, reduction="none"), atol=1e-6)
        True
    """
    log_q = F.log_softmax(student / temperature, dim=-1)
    if aggregation == "loss" and tail == "uniform":
        cross = teachers.cross(log_q)  # (N, K)
        per_teacher = teachers.neg_entropy() - cross if divergence == "kl" else -cross
        return temperature**2 * (weights * per_teacher).sum(-1)
    if aggregation == "target":
        weights = weights / weights.sum(-1, keepdim=True)
    if tail == "uniform":
        target = teachers.mixture(weights, student.shape[-1])
    else:
        target, neg_entropy = student_shaped(teachers, log_q, weights)
    if divergence == "soft_ce":
        per_position = -(target * log_q).sum(-1)
    elif aggregation == "loss":  # (student tails) Σ_k w_k Σ_v p_k log q is the mixture's cross term
        per_position = (weights * neg_entropy).sum(-1) - (target * log_q).sum(-1)
    else:
        per_position = (target * (target.clamp_min(_TINY).log() - log_q)).sum(-1)
    return temperature**2 * per_position
