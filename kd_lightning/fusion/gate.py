"""AMTML-KD's learned instance gate: per-sample teacher weights from the student's features."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parameter import UninitializedParameter

from kd_lightning.fusion.base import FusionRule


class LearnedGate(FusionRule):
    """Per-sample weights ``μ(x) = softmax_k((β(x) ⊙ θ_k)ᵀ W)``, trained with the student.

    After Liu, Zhang & Wang (2020, AMTML-KD), where ``β(x)`` is the student's pooled penultimate
    feature. **Our deviation:** fusion rules see logits only, so ``β(x)`` here is the student's
    logits (``needs_student = True``), detached: the gate learns from the distillation loss, the
    student is not pushed to move its logits to change the weights. ``θ`` ``(K, D)`` and ``W``
    ``(D,)`` are ``nn.Parameter`` s, so they sit in ``loss.parameters()``, hence in the optimizer
    and the checkpoint of a :class:`~kd_lightning.DistillationModule`. ``W`` starts near zero, so
    the weights start near uniform. Weights sum to one per sample; the target is ``Σ_k μ_k p_k``.

    Caution: trained on the distillation loss alone, the gate drifts toward the teacher the student
    already matches best, since that lowers the loss (as for learnable static weights).

    Args:
        num_teachers: ``K``.
        feature_dim: ``D``, the width of ``β`` (the number of classes here); ``None`` infers it
            at the first call (a ``DistillationModule`` does one dry run in ``setup("fit")`` so the
            parameters exist before the optimizer is built).

    Example:
        >>> gate = LearnedGate(num_teachers=3, feature_dim=10)
        >>> fusion = gate(torch.randn(3, 8, 10), student_logits=torch.randn(8, 10))
        >>> fusion.weights.shape, torch.allclose(fusion.weights.sum(-1), torch.ones(8))
        (torch.Size([8, 3]), True)
    """

    needs_student = True

    def __init__(self, num_teachers: int, feature_dim: int | None = None) -> None:
        super().__init__()
        if num_teachers < 1:
            raise ValueError(f"LearnedGate: num_teachers must be >= 1, got {num_teachers}")
        if feature_dim is not None and feature_dim < 1:
            raise ValueError(f"LearnedGate: feature_dim must be >= 1, got {feature_dim}")
        self.num_teachers = int(num_teachers)
        self.theta: nn.Parameter = UninitializedParameter()
        self.gate: nn.Parameter = UninitializedParameter()
        if feature_dim is not None:
            self._initialise(int(feature_dim))
        self._register_load_state_dict_pre_hook(self._materialise_from_state, with_module=True)

    def _initialise(self, feature_dim: int, device: torch.device | None = None) -> None:
        self.theta.materialize((self.num_teachers, feature_dim), device=device)
        self.gate.materialize((feature_dim,), device=device)
        with torch.no_grad():
            self.theta.normal_(0.0, 1.0)
            self.gate.normal_(0.0, 0.01 / math.sqrt(feature_dim))

    def weights(
        self,
        teacher_logits: Tensor,
        labels: Tensor | None,
        student_logits: Tensor | None = None,
    ) -> Tensor:
        """``softmax_k((β ⊙ θ_k)ᵀ W)`` with ``β`` the detached student logits, ``(*batch, K)``."""
        assert student_logits is not None  # FusionRule.forward checks it
        num_teachers = teacher_logits.shape[0]
        if num_teachers != self.num_teachers:
            raise ValueError(
                f"LearnedGate has num_teachers={self.num_teachers} but teacher_logits has "
                f"K = {num_teachers} teachers"
            )
        beta = student_logits.detach().float()
        if isinstance(self.theta, UninitializedParameter):
            self._initialise(beta.shape[-1], device=beta.device)
        if beta.shape[-1] != self.theta.shape[1]:
            raise ValueError(
                f"LearnedGate has feature_dim={self.theta.shape[1]} but the student gives "
                f"features of width {beta.shape[-1]}"
            )
        scores = torch.einsum("...d,kd,d->...k", beta, self.theta, self.gate)
        return F.softmax(scores, dim=-1)

    def _materialise_from_state(
        self, module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *args: object
    ) -> None:
        theta = state_dict.get(prefix + "theta")
        if theta is not None and isinstance(self.theta, UninitializedParameter):
            self._initialise(theta.shape[1])

    def extra_repr(self) -> str:
        dim = None if isinstance(self.theta, UninitializedParameter) else self.theta.shape[1]
        return f"num_teachers={self.num_teachers}, feature_dim={dim}"
