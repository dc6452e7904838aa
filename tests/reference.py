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
