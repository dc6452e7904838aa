"""Schedules for a loss hyper-parameter (temperature, α) over training progress in [0, 1]."""

from __future__ import annotations

import math
from typing import Literal

ScheduleKind = Literal["constant", "linear", "cosine", "ramp_up"]
SCHEDULE_KINDS: tuple[str, ...] = ("constant", "linear", "cosine", "ramp_up")


def schedule_value(kind: ScheduleKind, start: float, end: float, progress: float) -> float:
    """The value at ``progress`` (0 = start of training, 1 = end) going from ``start`` to ``end``.

    * ``constant``: ``start`` throughout;
    * ``linear``: straight line;
    * ``cosine``: half a cosine, flat at both ends;
    * ``ramp_up``: ``start + (end − start)·exp(−5 (1 − progress)²)``, the sigmoid-shaped ramp of
      Laine & Aila (2017) used by OKDDip and FFL for their consistency weights.

    Examples:
        >>> [round(schedule_value("cosine", 4.0, 1.0, p), 2) for p in (0.0, 0.5, 1.0)]
        [4.0, 2.5, 1.0]
    """
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"unknown schedule {kind!r}; choose one of {list(SCHEDULE_KINDS)}")
    progress = min(1.0, max(0.0, progress))
    if kind == "constant":
        return start
    if kind == "linear":
        shape = progress
    elif kind == "cosine":
        shape = 0.5 * (1.0 - math.cos(math.pi * progress))
    else:
        shape = math.exp(-5.0 * (1.0 - progress) ** 2)
    return start + (end - start) * shape
