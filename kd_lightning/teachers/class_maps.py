"""Teachers of other class layouts: maps from a teacher's classes into the student's."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor

#: A class the teacher does not know gets the logit ``row max − MISSING_CLASS_LOGIT_GAP``.
#: Relative to the row and finite, so its probability is at most ``exp(−gap / T)`` (below 4e-44
#: for any temperature T ≤ 100; 0 in float32 for T ≤ 95), while every divergence, entropy and
#: cross-entropy stays finite: no ``−inf`` (``0 · ∞ = NaN``) and no ``float32.min`` that would
#: overflow once squared (logit MSE) or multiplied by T² (reverse KL).
MISSING_CLASS_LOGIT_GAP = 1e4


def map_classes(output: Tensor, index: Tensor, num_classes: int) -> Tensor:
    """Logits ``(..., num_classes)`` with teacher class ``j`` at student class ``index[j]`` and
    every class the teacher does not know at ``row max − MISSING_CLASS_LOGIT_GAP``.

    Examples:
        >>> import torch
        >>> map_classes(torch.tensor([[1.0, 3.0]]), torch.tensor([2, 0]), 3).tolist()
        [[3.0, -9997.0, 1.0]]
    """
    gap = output.amax(dim=-1, keepdim=True) - MISSING_CLASS_LOGIT_GAP
    mapped = gap.expand(*output.shape[:-1], num_classes).clone()
    mapped[..., index] = output
    return mapped


def check_class_map(name: str, class_map: Any, num_classes: int | None) -> tuple[int, ...]:
    """Validate ``class_maps[name]`` and return it as a tuple of ints.

    Examples:
        >>> check_class_map("pair", [2, 0], num_classes=3)
        (2, 0)
    """
    label = f"class_maps['{name}']"
    if isinstance(class_map, Tensor):
        class_map = class_map.tolist()
    if isinstance(class_map, str | bytes | Mapping) or not isinstance(class_map, Iterable):
        raise TypeError(
            f"{label} must be a sequence of student class indices, got {type(class_map).__name__}"
        )
    values = list(class_map)
    if not values:
        raise ValueError(f"{label} is empty: give the student class of each teacher class")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{label} must hold integer class indices, got {value!r}")
    indices = [int(value) for value in values]
    duplicates = sorted({index for index in indices if indices.count(index) > 1})
    if duplicates:
        raise ValueError(
            f"{label} maps several teacher classes to the same student class: duplicates "
            f"{duplicates} in {indices}"
        )
    upper = len(indices) if num_classes is None else num_classes
    outside = [index for index in indices if not 0 <= index < upper]
    if num_classes is not None and outside:
        raise ValueError(
            f"{label} has indices outside [0, num_classes) = [0, {num_classes}): {outside}"
        )
    if any(index < 0 for index in indices):
        raise ValueError(f"{label} has negative indices: {[i for i in indices if i < 0]}")
    if outside:
        raise ValueError(
            f"{label} = {indices} covers a subset of the student's classes (it is not a "
            f"permutation of 0..{len(indices) - 1}): pass num_classes=<the student's class count>"
        )
    return tuple(indices)
