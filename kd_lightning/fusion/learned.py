"""One learned weight per teacher, the same for every sample, trained with the student."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.fusion.base import FusionContext, FusionRule, RuleOptimizer
from kd_lightning.fusion.static import broadcast, normalised_weights, of_teachers


class LearnedWeights(FusionRule, name="learned"):
    """Weights ``w = softmax(θ)`` over one free parameter per teacher, shared by all samples.

    ``θ`` is the ``nn.Parameter`` ``weight_logits``, initialised at the log of the normalised
    ``weights`` (zeros, i.e. uniform, with only ``num_teachers``). It trains with whichever
    optimizer holds this module's parameters (a :class:`~kd_lightning.DistillationModule`
    optimises the loss's parameters with the student's) and is saved in its ``state_dict``. The
    weights sum to one; the target is ``Σ_k w_k p_k``. When only some teachers ran, the softmax
    is taken over theirs.

    Caution: trained on the distillation loss alone (the defaults here), the weights drift toward
    the teacher the student already matches best, since that lowers the loss. The safeguards of
    AMTML-KD's gate (:class:`~kd_lightning.fusion.LearnedGate`) apply here too, and
    ``kd-train fusion=learned`` sets them: ``l2`` adds ``l2·‖θ‖²`` to the objective
    (:meth:`penalty`), pulling the weights back toward uniform; ``optimizer`` gives ``θ`` its own
    optimizer (:attr:`own_optimizer`), with ``lr_milestones`` and a window of ``train_epochs``
    after which the weights stay fixed. On MNIST-1D (MLP student; teachers CNN / GRU / MLP;
    augmented; 60 epochs) the mean weights go from 0.02 / 0.01 / 0.97 without them to
    0.28 / 0.29 / 0.44 with ``l2 = 0.5``, SGD at 0.1 (momentum 0.9) and milestones 40 and 50.

    Args:
        num_teachers: The number of teachers (uniform start), when ``weights`` is not given.
        weights: Strictly positive starting weights, one per teacher.
        l2: Weight of the L2 penalty on ``θ``; 0 for none.
        optimizer: called with ``θ`` to build its own optimizer; ``None`` trains it with the
            student's optimizer, throughout (then no ``lr_milestones``, no ``train_epochs``).
        lr_milestones: epochs from which ``θ``'s learning rate is divided by 10 once more.
        train_epochs: train ``θ`` during the first ``train_epochs`` epochs only; ``None``:
            throughout.

    Examples:
        >>> import torch
        >>> z = torch.zeros(2, 1, 3)  # K = 2 teachers, B = 1, C = 3
        >>> rule = LearnedWeights(num_teachers=2)
        >>> rule(z).weights.tolist(), [p.shape for p in rule.parameters()]
        ([[0.5, 0.5]], [torch.Size([2])])
    """

    def __init__(
        self,
        num_teachers: int | None = None,
        weights: Sequence[float] | None = None,
        l2: float = 0.0,
        optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
        lr_milestones: Sequence[int] = (),
        train_epochs: int | None = None,
    ) -> None:
        super().__init__()
        if not l2 >= 0:
            raise ValueError(f"LearnedWeights: l2 must be >= 0, got {l2}")
        self.l2 = float(l2)
        self._own_optimizer = RuleOptimizer.from_options(
            "LearnedWeights", optimizer, lr_milestones, train_epochs
        )
        initial = normalised_weights(weights, num_teachers, positive=True)
        if initial is None:
            raise ValueError("LearnedWeights needs `num_teachers` or starting `weights`")
        self.weight_logits = nn.Parameter(initial.log())

    @property
    def own_optimizer(self) -> RuleOptimizer | None:
        """``θ``'s own optimizer, learning-rate milestones and training window, or ``None``."""
        return self._own_optimizer

    def weights(self, teacher_logits: Tensor, context: FusionContext) -> Tensor:
        """``softmax(θ)`` broadcast over the batch, ``(*batch, K)``."""
        logits = of_teachers(self.weight_logits, teacher_logits, context, type(self).__name__)
        return broadcast(F.softmax(logits, dim=0), teacher_logits)

    def penalty(self) -> Tensor | float:
        """``l2·‖θ‖²``."""
        return self.l2 * self.weight_logits.square().sum() if self.l2 else 0.0

    def extra_repr(self) -> str:
        plan = self._own_optimizer
        return (
            f"num_teachers={self.weight_logits.shape[0]}, l2={self.l2}, "
            f"own_optimizer={plan is not None}, train_epochs={None if plan is None else plan.epochs}"
        )
