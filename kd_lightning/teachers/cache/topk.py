"""Top-k compression of teacher logits, the logits rebuilt from it with the tail mass spread, and
a step's teacher outputs in that form."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from kd_lightning.teachers.source import TeacherOutputs


@dataclass(frozen=True)
class TopKLogits:
    """The ``k`` largest logits of each row, their class indices, and the log-mass of the rest.

    Attributes:
        values: ``(..., k)`` float32, the largest logits, in decreasing order.
        indices: ``(..., k)`` integer classes of ``values`` (int16 when the classes fit, else int32).
        tail_logsumexp: ``(...)`` float32, ``logsumexp`` of the logits outside the top k
            (``-inf`` when ``k`` is the number of classes).
        num_classes: ``C``, the width of the rows.
    """

    values: Tensor
    indices: Tensor
    tail_logsumexp: Tensor
    num_classes: int

    def to(self, device: torch.device | str) -> TopKLogits:
        """The same outputs on ``device``."""
        return TopKLogits(
            self.values.to(device),
            self.indices.to(device),
            self.tail_logsumexp.to(device),
            self.num_classes,
        )


def index_dtype(num_classes: int) -> torch.dtype:
    """The narrowest signed integer type holding class indices below ``num_classes``."""
    return torch.int16 if num_classes <= torch.iinfo(torch.int16).max + 1 else torch.int32


def compress_topk(logits: Tensor, k: int) -> TopKLogits:
    """Keep the ``k`` largest logits of each row (last dimension) and the tail's ``logsumexp``.

    The tail's ``logsumexp`` is computed from the tail's own logits (shifted by their maximum),
    not as ``log(1 − Σ top-k probabilities)``, so a tail of tiny mass keeps its relative
    precision in float32.

    Examples:
        >>> packed = compress_topk(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), k=2)
        >>> packed.values, packed.indices
        (tensor([[3., 2.]]), tensor([[1, 2]], dtype=torch.int16))
        >>> round(packed.tail_logsumexp.item(), 4)  # log(e^1 + e^0)
        1.3133
    """
    num_classes = logits.shape[-1]
    if not 1 <= k <= num_classes:
        raise ValueError(f"top_k must lie in [1, {num_classes}] (the number of classes), got {k}")
    logits = logits.float()
    values, indices = logits.topk(k, dim=-1)
    tail = logits.scatter(-1, indices, -math.inf)
    return TopKLogits(
        values=values,
        indices=indices.to(index_dtype(num_classes)),
        tail_logsumexp=tail.logsumexp(-1),
        num_classes=num_classes,
    )


def expand_topk(packed: TopKLogits) -> Tensor:
    """Rebuild float32 logits of width ``C`` from :func:`compress_topk`'s output.

    The top-k classes get their stored logits ``v_i``; each of the ``C − k`` other classes gets
    ``tail_logsumexp − log(C − k)``. The softmax of the result therefore gives every top-k class
    exactly its original probability ``exp(v_i) / Σ_c exp(z_c)`` and spreads the remaining mass
    evenly over the other classes. At ``k = C`` the logits come back unchanged. Temperature
    ``T ≠ 1`` keeps the top-k classes' ratios exact; the tail then stands for the T = 1 mass.

    Examples:
        >>> logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
        >>> rebuilt = expand_topk(compress_topk(logits, k=2))
        >>> torch.allclose(rebuilt.softmax(-1)[0, 1:3], logits.softmax(-1)[0, 1:3])
        True
        >>> torch.equal(expand_topk(compress_topk(logits, k=4)), logits)
        True
    """
    k, num_classes = packed.values.shape[-1], packed.num_classes
    if k == num_classes:
        fill = torch.zeros_like(packed.tail_logsumexp)
    else:
        fill = packed.tail_logsumexp - math.log(num_classes - k)
    rows = fill.unsqueeze(-1).expand(*fill.shape, num_classes).clone()
    return rows.scatter_(-1, packed.indices.long(), packed.values.float())


class TopKTeacherOutputs(TeacherOutputs):
    """:class:`~kd_lightning.teachers.source.TeacherOutputs` of the teachers' top-k outputs
    ``topk`` (values and ids ``(K, *batch, k)``, tail ``(K, *batch)``), whose dense ``logits``
    are rebuilt from them (:func:`~kd_lightning.teachers.cache.topk.expand_topk`) only when read,
    once. A :class:`~kd_lightning.DistillationModule` hands ``topk`` to a loss that
    :attr:`~kd_lightning.DistillationLoss.accepts_topk` instead of ``logits``, and to its step
    outputs as ``teacher_topk``, so that a sparse step never builds the dense ``(K, *batch, C)``.

    Examples:
        >>> topk = TopKLogits(torch.zeros(2, 1, 3), torch.zeros(2, 1, 3, dtype=torch.long),
        ...                   torch.zeros(2, 1), num_classes=5)
        >>> outputs = TopKTeacherOutputs(topk, (0, 1))
        >>> outputs.topk.values.shape, "logits" in vars(outputs)  # nothing expanded yet
        (torch.Size([2, 1, 3]), False)
        >>> outputs.logits.shape, outputs.logits is outputs.logits
        (torch.Size([2, 1, 5]), True)
    """

    topk: TopKLogits

    def __init__(
        self,
        topk: TopKLogits,
        ran: tuple[int, ...],
        features: Mapping[str, Tensor] | None = None,
    ) -> None:
        object.__setattr__(self, "topk", topk)
        object.__setattr__(self, "ran", ran)
        object.__setattr__(self, "features", {} if features is None else features)
        self._check_rows(topk.values.shape[0])

    @cached_property
    def logits(self) -> Tensor:
        """The dense float32 logits ``(K, *batch, C)`` rebuilt from ``topk``, on first read."""
        return expand_topk(self.topk)

    def __repr__(self) -> str:
        shape = tuple(self.topk.values.shape)
        return (
            f"TopKTeacherOutputs(topk=<values {shape}, C={self.topk.num_classes}>, ran={self.ran})"
        )
