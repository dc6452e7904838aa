"""AMTML-KD's learned instance gate: per-sample teacher weights from the student's features."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parameter import UninitializedParameter

from kd_lightning.fusion.base import FusionContext, FusionRule, RuleOptimizer
from kd_lightning.fusion.static import of_teachers

GateInit = Literal["normal", "near_uniform"]
Pooling = Literal["mean", "max"]
#: The gate's own optimizer in the authors' code: SGD at 0.1 with momentum 0.9.
AUTHORS_GATE_OPTIMIZER = partial(torch.optim.SGD, lr=0.1, momentum=0.9)


class LearnedGate(FusionRule, name="learned_gate"):
    """Per-sample weights ``μ(x) = softmax_k((β(x) ⊙ θ_k)ᵀ W)``, trained beside the student.

    After Liu, Zhang & Wang ("Adaptive multi-teacher multi-level knowledge distillation",
    Neurocomputing 2020, AMTML-KD; code FLHonker/AMTML-KD-code): ``β(x)`` is the student's
    pooled penultimate feature, the output of the student layer named ``student_layer``, which
    the rule declares in :attr:`student_layers` and reads from ``student_features`` (a
    :class:`~kd_lightning.DistillationModule` taps that layer during the student's forward pass).
    An output shaped like the logits, ``(*batch, D)`` (``(B, D)``, or ``(B, L, D)`` per token), is
    used as it is; a ``(B, D, *spatial)`` feature map is pooled over its positions; a layer
    returning a tuple (a GRU) is read at element 0. Without ``student_layer``, ``β`` is the
    student's logits. Weights sum to one per sample (over the teachers that ran, when only some
    did); the target is ``Σ_k μ_k p_k``.

    **Training, as the authors' code does it** (``LR_adaptive_*.ipynb``), by default:

    * ``θ`` ``(K, D)`` and ``W`` ``(D,)`` start from N(0, 1) (``init="normal"``);
    * they have their own optimizer, SGD at 0.1 with momentum 0.9, divided by 10 at epochs 40
      and 50 (40 and 70 in ``LR_adaptive_learning.ipynb``) (:attr:`own_optimizer`; a
      ``DistillationModule`` steps it with the student's);
    * they train only during the first 80 epochs (``train_epochs``), then stay as they are: the
      student goes on learning from a fixed gate;
    * the loss adds ``l2·(‖W‖² + ‖θ‖²)`` (:meth:`penalty`; after the window it is a constant).
      The code writes ``0.1`` beside a distillation term that ``nn.KLDivLoss()`` averages over
      the C classes as well as the batch and then doubles: on its 10-class data that term is
      C/2 = 5 times smaller than this library's ``batchmean`` KL at the same α and T, so the
      code's balance between the two is ``l2 = 0.5`` here, the default. (``LR_adaptive_KD.ipynb``
      switches the penalty off by calling its ``eval()`` first; ``LR_adaptive_learning.ipynb``,
      the multi-level method, keeps it.)

    What it changes on MNIST-1D (MLP student; teachers CNN / GRU / MLP; augmented; 60 epochs;
    mean test-set weights over seeds 0-2): trained with the student's Adam and no penalty, the
    gate puts all the weight on the MLP teacher, the one the student already matches best
    (0.00 / 0.00 / 1.00; students 1.6 points below ``mean_probs``); as the code with ``l2 =
    0.1``, 0.09 / 0.10 / 0.81; with the default ``l2 = 0.5``, 0.26 / 0.26 / 0.48, the students
    level with ``mean_probs`` (+0.7 ± 0.7 points).

    Where we differ from the code: ``β`` is detached (the student is not pushed to move its
    features to change the weights; the code back-propagates through it), and the distillation
    term is this library's KL with ``batchmean`` (the code's ``nn.KLDivLoss()`` divides by the
    class count too). Pooling: the code pools the last feature map by averaging, then applies a
    max-pool whose window is the already pooled 1 × 1 map, which changes nothing, so ``β`` is the
    average (``pooling="mean"``, the default); ``"max"`` takes each channel's maximum.

    Args:
        num_teachers: ``K``.
        feature_dim: ``D``, the width of ``β``; ``None`` infers it at the first call (a
            ``DistillationModule`` does one dry run in ``setup("fit")`` so the parameters exist
            before the optimizer is built).
        student_layer: the dotted name of the student's penultimate layer (e.g. ``"hidden"`` for
            :class:`~kd_lightning.models.MLP`); ``None`` uses the student's logits.
        l2: weight of the L2 penalty on ``θ`` and ``W`` (the code's 0.1 in this library's units
            for 10 classes); 0 for none.
        init: ``"normal"``: ``θ`` and ``W`` from N(0, 1), as the code; ``"near_uniform"``: ``W``
            from N(0, (0.01/√D)²), so the weights start near uniform.
        pooling: how a feature map is pooled over its positions, ``"mean"`` or ``"max"``.
        optimizer: called with ``θ`` and ``W`` to build their own optimizer; ``None`` trains them
            with the student's optimizer, throughout (then no ``lr_milestones``, no
            ``train_epochs``).
        lr_milestones: epochs from which the gate's learning rate is divided by 10 once more.
        train_epochs: train the gate during the first ``train_epochs`` epochs only; ``None``:
            throughout.

    Examples:
        >>> from kd_lightning.models.taps import FeatureTaps
        >>> student = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
        >>> gate = LearnedGate(num_teachers=2, student_layer="1")
        >>> with FeatureTaps(student, gate.student_layers) as taps:
        ...     logits = student(torch.randn(8, 4))
        >>> fusion = gate(torch.randn(2, 8, 3), student_logits=logits, student_features=taps.features)
        >>> gate.theta.shape, fusion.weights.shape, torch.allclose(fusion.weights.sum(-1), torch.ones(8))
        (torch.Size([2, 6]), torch.Size([8, 2]), True)
        >>> gate.own_optimizer.epochs, gate.own_optimizer.milestones
        (80, (40, 50))
    """

    needs_student = True

    def __init__(
        self,
        num_teachers: int,
        feature_dim: int | None = None,
        student_layer: str | None = None,
        l2: float = 0.5,
        init: GateInit = "normal",
        pooling: Pooling = "mean",
        optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
        | None = AUTHORS_GATE_OPTIMIZER,
        lr_milestones: Sequence[int] = (40, 50),
        train_epochs: int | None = 80,
    ) -> None:
        super().__init__()
        if num_teachers < 1:
            raise ValueError(f"LearnedGate: num_teachers must be >= 1, got {num_teachers}")
        if feature_dim is not None and feature_dim < 1:
            raise ValueError(f"LearnedGate: feature_dim must be >= 1, got {feature_dim}")
        if not l2 >= 0:
            raise ValueError(f"LearnedGate: l2 must be >= 0, got {l2}")
        if init not in ("normal", "near_uniform"):
            raise ValueError(f"LearnedGate: init must be 'normal' or 'near_uniform', got {init!r}")
        if pooling not in ("mean", "max"):
            raise ValueError(f"LearnedGate: pooling must be 'mean' or 'max', got {pooling!r}")
        self.num_teachers = int(num_teachers)
        self.student_layer = student_layer
        self.l2 = float(l2)
        self.init = init
        self.pooling = pooling
        self._own_optimizer = RuleOptimizer.from_options(
            "LearnedGate", optimizer, lr_milestones, train_epochs
        )
        self.theta: nn.Parameter | UninitializedParameter = UninitializedParameter()
        self.gate: nn.Parameter | UninitializedParameter = UninitializedParameter()
        if feature_dim is not None:
            self._initialise(int(feature_dim))
        self._register_load_state_dict_pre_hook(self._materialise_from_state, with_module=True)

    @property
    def student_layers(self) -> tuple[str, ...]:
        """``(student_layer,)``, or none when ``β`` is the student's logits."""
        return () if self.student_layer is None else (self.student_layer,)

    @property
    def own_optimizer(self) -> RuleOptimizer | None:
        """The gate's own optimizer, learning-rate milestones and training window, or ``None``."""
        return self._own_optimizer

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
        if features.ndim > context.student_logits.ndim:  # a map (B, D, *spatial): pool it
            positions = features.flatten(context.student_logits.ndim)
            return positions.mean(-1) if self.pooling == "mean" else positions.amax(-1)
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
            gate.normal_(0.0, 1.0 if self.init == "normal" else 0.01 / math.sqrt(feature_dim))

    def _materialise_from_state(
        self, module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *args: object
    ) -> None:
        theta = state_dict.get(prefix + "theta")
        if theta is not None and isinstance(self.theta, UninitializedParameter):
            self._initialise(theta.shape[1])

    def extra_repr(self) -> str:
        dim = None if isinstance(self.theta, UninitializedParameter) else self.theta.shape[1]
        plan = self._own_optimizer
        return (
            f"num_teachers={self.num_teachers}, feature_dim={dim}, "
            f"student_layer={self.student_layer!r}, l2={self.l2}, init={self.init!r}, "
            f"pooling={self.pooling!r}, own_optimizer={plan is not None}, "
            f"train_epochs={None if plan is None else plan.epochs}"
        )
