"""Shared by the tests of the distillation objective: float64 NumPy references, fusion names."""

from __future__ import annotations

import numpy as np

#: The fusion rules that ``DistillationLoss`` builds from their name alone.
FUSIONS_BY_NAME = (
    "mean_probs",
    "mean_logits",
    "entropy",
    "confidence",
    "correct_only",
    "vote",
    "random",
)


def np_log_softmax(z: np.ndarray, t: float = 1.0) -> np.ndarray:
    """``log_softmax(z / t)`` over the last axis."""
    z = z / t
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kl(p: np.ndarray, s: np.ndarray, t: float) -> np.ndarray:
    """T² Σ_c p (log p − log q) at every position, with ``q = softmax(s / t)``."""
    return t**2 * (p * (np.log(p) - np_log_softmax(s, t))).sum(-1)


def library_rules_on_logits() -> list[str]:
    """The library's fusion rules that read nothing beyond logits, labels and the student (every
    rule but ``routed``, which reads a batch field; ``tests/test_routed.py`` covers it, plain,
    chunked and in a module)."""
    from kd_lightning.fusion import FUSION_RULES

    return sorted(
        name
        for name, rule in FUSION_RULES.items()
        if rule.__module__.startswith("kd_lightning.") and name != "routed"
    )
