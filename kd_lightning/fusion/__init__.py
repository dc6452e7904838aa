"""Rules that fuse several teachers' logits into per-teacher weights and one target.

Each rule is an ``nn.Module`` called as ``rule(teacher_logits, labels, temperature, ...)`` on
stacked logits ``(K, *batch, C)``; it returns a :class:`Fusion`. Its :meth:`FusionRule.weights`
receives one :class:`FusionContext`. Build a rule by name with :func:`build_fusion`.

Examples:
    >>> import torch
    >>> rule = build_fusion("entropy", tau=1.0)
    >>> rule(torch.randn(3, 8, 10)).target.shape
    torch.Size([8, 10])
"""

from __future__ import annotations

from typing import Any

from kd_lightning.fusion.aekd import GradientSpaceWeights
from kd_lightning.fusion.averages import MeanLogits, MeanProbabilities
from kd_lightning.fusion.base import Fusion, FusionContext, FusionRule
from kd_lightning.fusion.confidence import ConfidenceAware
from kd_lightning.fusion.correct import CorrectTeachersOnly
from kd_lightning.fusion.entropy import EntropyWeighted
from kd_lightning.fusion.gate import LearnedGate
from kd_lightning.fusion.learned import LearnedWeights
from kd_lightning.fusion.random_teacher import RandomTeacher
from kd_lightning.fusion.routed import RoutedTeachers
from kd_lightning.fusion.static import StaticWeights
from kd_lightning.fusion.vote import MajorityVote

FUSION_RULES = FusionRule.registry
"""Every rule by name: each subclass declared with ``name=`` (``class R(FusionRule, name="r")``),
the library's rules and those of any package imported so far."""


def build_fusion(name: str, **kwargs: Any) -> FusionRule:
    """Instantiate the fusion rule registered under ``name``.

    Args:
        name: A key of :data:`FUSION_RULES`.
        **kwargs: Passed to the rule's constructor.

    Returns:
        The rule.

    Examples:
        >>> build_fusion("static", weights=[1.0, 3.0]).fixed_weights.tolist()
        [0.25, 0.75]
    """
    if name not in FUSION_RULES:
        raise ValueError(f"unknown fusion rule {name!r}; known rules: {sorted(FUSION_RULES)}")
    return FUSION_RULES[name](**kwargs)


__all__ = [
    "FUSION_RULES",
    "ConfidenceAware",
    "CorrectTeachersOnly",
    "EntropyWeighted",
    "Fusion",
    "FusionContext",
    "FusionRule",
    "GradientSpaceWeights",
    "LearnedGate",
    "LearnedWeights",
    "MajorityVote",
    "MeanLogits",
    "MeanProbabilities",
    "RandomTeacher",
    "RoutedTeachers",
    "StaticWeights",
    "build_fusion",
]
