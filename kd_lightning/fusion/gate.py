"""AMTML-KD's learned instance gate: per-sample teacher weights from the student's features."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parameter import UninitializedParameter

from kd_lightning.fusion.base import FusionContext, FusionRule
from kd_lightning.fusion.static import of_teachers


class LearnedGate(FusionRule, name="learned_gate"):
    """Per-sample weights ``μ(x) = softmax_k((β(x) ⊙ θ_k)ᵀ W)``, trained with the student.

    After Liu, Zhang & Wang (2020, AMTML-KD): ``β(x)`` is the student's pooled penultimate feature,
    the output of the student layer named ``student_layer``, which the rule declares in
    :attr:`student_layers` and reads from ``student_features`` (a
    :class:`~kd_lightning.DistillationModule` taps that layer during the student's forward pass,
    as it taps the layers of feature hints). An output shaped like the logits, ``(*batch, D)``
    (``(B, D)``, or ``(B, L, D)`` per token), is used as it is; a ``(B, D, *spatial)`` feature
    map is averaged over its spatial positions (global average pooling, as in the paper); a layer
    returning a tuple (a GRU) is read at element 0. Without
    ``student_layer``, ``β`` is the student's logits.

    ``β`` is detached: the gate learns from the distillation loss, the student is not pushed to
    move its features to change the weights. ``θ`` ``(K, D)`` and ``W`` ``(D,)`` are
    ``nn.Parameter`` s, so they sit in ``loss.parameters()``, hence in the optimizer and the
    checkpoint of a ``DistillationModule``. ``W`` starts near zero, so the weights start near
    uniform. Weights sum to one per sample (over the teachers that ran, when only some did); the
    target is ``Σ_k μ_k p_k``.

    Caution: trained on the distillation loss alone, the gate drifts toward the teacher the
    student already matches best, since that lowers the loss. The authors' code trains θ and W
    with an L2 penalty ``0.1·(‖W‖² + ‖θ‖²)`` (among other safeguards: its own SGD, a training
    window, N(0, 1) initialisation); ``l2`` adds that penalty (:meth:`penalty`).

    Args:
        num_teachers: ``K``.
        feature_dim: ``D``, the width of ``β``; ``None`` infers it at the first call (a
            ``DistillationModule`` does one dry run in ``setup("fit")`` so the parameters exist
            before the optimizer is built).
        student_layer: the dotted name of the student's penultimate layer (e.g. ``"hidden"`` for
            :class:`~kd_lightning.models.MLP`); ``None`` uses the student's logits.
        l2: Weight of the L2 penalty on ``θ`` and ``W``; 0 for none.

    Example:
        >>> from kd_lightning.models.taps import FeatureTaps
        >>> student = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
        >>> gate = LearnedGate(num_teachers=2, student_layer="1")
        >>> with FeatureTaps(student, gate.student_layers) as taps:
        ...     logits = student(torch.randn(8, 4))
        >>> fusion = gate(torch.randn(2, 8, 3), student_logits=logits, student_features=taps.features)
        >>> gate.theta.shape, fusion.weights.shape, torch.allclose(fusion.weights.sum(-1), torch.ones(8))
        (torch.Size([2, 6]), torch.Size([8, 2]), True)
    """

    needs_student = True

    def __init__(
        self,
        num_teachers: int,
        feature_dim: int | None = None,
        student_layer: str | None = None,
        l2: float = 0.0,
    ) -> None:
        super().__init__()
        if not l2 >= 0:
            raise ValueError(f"LearnedGate: l2 must be >= 0, got {l2}")
        self.l2 = float(l2)
        if num_teachers < 1:
            raise ValueError(f"LearnedGate: num_teachers must be >= 1, got {num_teachers}")
        if feature_dim is not None and feature_dim < 1:
            raise ValueError(f"LearnedGate: feature_dim must be >= 1, got {feature_dim}")
        self.num_teachers = int(num_teachers)
        self.student_layer = student_layer
        self.theta: nn.Parameter | UninitializedParameter = UninitializedParameter()
        self.gate: nn.Parameter | UninitializedParameter = UninitializedParameter()
        if feature_dim is not None:
            self._initialise(int(feature_dim))
        self._register_load_state_dict_pre_hook(self._materialise_from_state, with_module=True)

    @property
    def student_layers(self) -> tuple[str, ...]:
        """``(student_layer,)``, or none when ``β`` is the student's logits."""
        return () if self.student_layer is None else (self.student_layer,)

    def weights(self, teacher_logits: Tensor, context: FusionContext) -> Tensor:
        """``softmax_k((β ⊙ θ_k)ᵀ W)``, ``(*batch, K)``."""
        beta = self._beta(context)
        if isinstance(self.theta, UninitializedParameter):
            self._initialise(beta.shape[-1], device=beta.device)
        if beta.shape[-1] != self.theta.shape[1]:
            raise ValueError(
                f"LearnedGate has feature_dim={self.theta.shape[1]} but the student gives "
                f"features of width {beta.shape[-1]}"
            )
        theta = of_teachers(self.theta, teacher_logits, context, type(self).__name__)
        scores = torch.einsum("...d,kd,d->...k", beta, theta, self.gate)
        return F.softmax(scores, dim=-1)

    def _beta(self, context: FusionContext) -> Tensor:
        """The student's detached features at ``student_layer`` (pooled), or its logits."""
        assert context.student_logits is not None  # FusionRule.forward enforces needs_student
        if self.student_layer is None:
            return context.student_logits.detach()
        features = context.student_features[self.student_layer].detach().float()
        if features.shape[0] != context.student_logits.shape[0]:
            raise ValueError(
                f"LearnedGate: the student's {self.student_layer!r} output has batch size "
                f"{features.shape[0]}, its logits {context.student_logits.shape[0]}: tap the "
                f"layer during the same forward pass"
            )
        if features.ndim > context.student_logits.ndim:  # a map (B, D, *spatial): average it
            return features.flatten(context.student_logits.ndim).mean(-1)
        return features  # (*batch, D), e.g. (B, L, D) per token

    def penalty(self) -> Tensor | float:
        """``l2·(‖W‖² + ‖θ‖²)``, once the parameters exist."""
        if not self.l2 or isinstance(self.theta, UninitializedParameter):
            return 0.0
        return self.l2 * (self.gate.square().sum() + self.theta.square().sum())

    def _initialise(self, feature_dim: int, device: torch.device | None = None) -> None:
        theta, gate = self.theta, self.gate
        assert isinstance(theta, UninitializedParameter)  # callers initialise only once
        assert isinstance(gate, UninitializedParameter)
        theta.materialize((self.num_teachers, feature_dim), device=device)
        gate.materialize((feature_dim,), device=device)
        with torch.no_grad():
            theta.normal_(0.0, 1.0)
            gate.normal_(0.0, 0.01 / math.sqrt(feature_dim))

    def _materialise_from_state(
        self, module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *args: object
    ) -> None:
        theta = state_dict.get(prefix + "theta")
        if theta is not None and isinstance(self.theta, UninitializedParameter):
            self._initialise(theta.shape[1])

    def extra_repr(self) -> str:
        dim = None if isinstance(self.theta, UninitializedParameter) else self.theta.shape[1]
        return (
            f"num_teachers={self.num_teachers}, feature_dim={dim}, "
            f"student_layer={self.student_layer!r}, l2={self.l2}"
        )
