"""FFL: sub-networks plus a fusion classifier over their features, distilling into each other."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from kd_lightning.functional.online import ffl_loss
from kd_lightning.losses.schedules import schedule_value
from kd_lightning.modules.online.parts import FusionClassifier
from kd_lightning.modules.online.peers import OnlinePeersModule, Peers
from kd_lightning.modules.optim import OptimizerFactory, SchedulerFactory

FUSED = "fused"


class FFLModule(OnlinePeersModule):
    """Feature Fusion Learning (Kim, Hyun, Chung, Kwak, "Feature Fusion for Online Mutual
    Knowledge Distillation", ICPR 2020).

    The sub-networks' features (tapped at ``feature_layers``) are concatenated and classified by
    a fusion module (:class:`~kd_lightning.modules.online.parts.FusionClassifier`) into fused
    logits ``z_f``. The loss (:func:`~kd_lightning.functional.ffl_loss`) is
    ``Σ CE(z_i) + CE(z_f) + w(e)·[Σ T²·KL(sg p_f ‖ p_i) + T²·KL(sg softmax(mean z_i / T) ‖ p_f)]``
    with the ramp-up ``w(e) = exp(−5 (1 − e/ramp_epochs)²)``. The fused classifier's
    cross-entropy also trains the sub-networks' features, as in the official code
    (Jangho-Kim/FFL-pytorch); one optimizer covers sub-networks and fusion module (the code uses
    two with the same settings).

    ``student`` (sub-network 0) is reported as the student; the other sub-networks and
    ``fused`` are its teachers.

    Args:
        student: sub-network 0, the network reported.
        peers: the other sub-networks, or a factory of them (see
            :func:`~kd_lightning.modules.online.peers.name_peers`).
        num_peers: with a factory, K, the student included.
        feature_layers: the layer tapped in every sub-network, or one per sub-network; the
            tapped features must have the same kind and length.
        temperature: T of the KL terms (3 in the paper).
        ramp_epochs: epochs of the ramp-up of w (80, as in OKDDip's code).
        optimizer, scheduler, scheduler_interval, batch_adapter: as in :class:`DMLModule`.

    Examples:
        >>> net = lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> module = FFLModule(net(), net, feature_layers="1")
        >>> module.materialize((torch.randn(5, 4), torch.zeros(5, dtype=torch.long)))
        >>> loss, logits = module.objective(torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))
        >>> module.teacher_names, logits["fused"].shape
        (['peer1', 'fused'], torch.Size([5, 3]))
    """

    def __init__(
        self,
        student: nn.Module,
        peers: Peers,
        feature_layers: str | Sequence[str],
        num_peers: int = 2,
        temperature: float = 3.0,
        ramp_epochs: int = 80,
        optimizer: OptimizerFactory = torch.optim.Adam,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
        batch_adapter: Callable[[Any], tuple[Any, Tensor]] | None = None,
    ) -> None:
        if ramp_epochs < 1:
            raise ValueError(f"ramp_epochs must be ≥ 1, got {ramp_epochs}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        super().__init__(
            student,
            peers,
            num_peers,
            optimizer,
            scheduler,
            scheduler_interval,
            batch_adapter,
            extra_outputs=[FUSED],
        )
        if FUSED in self.peers:
            raise ValueError(f"peers: {FUSED!r} names the fused output; rename that sub-network")
        self.save_hyperparameters(
            ignore=["student", "peers", "optimizer", "scheduler", "batch_adapter"]
        )
        self.feature_layers = self.layers_to_tap(feature_layers, self.names)
        self.fusion: FusionClassifier | None = None

    def consistency_weight(self) -> float:
        """``exp(−5 (1 − e/ramp_epochs)²)`` at the current epoch."""
        return schedule_value("ramp_up", 0.0, 1.0, self.current_epoch / self.hparams["ramp_epochs"])

    def needs_parts(self) -> bool:
        return self.fusion is None

    def build_parts(self, inputs: Any) -> None:
        logits, features = self.tapped_forward(inputs, self.feature_layers)
        num_classes = next(iter(logits.values())).shape[-1]
        self.fusion = FusionClassifier([features[name] for name in self.names], num_classes)

    def objective(self, inputs: Any, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if self.fusion is None:
            raise RuntimeError("call module.materialize(batch) (or fit) to build the fusion module")
        logits, features = self.tapped_forward(inputs, self.feature_layers)
        logits[FUSED] = self.fusion([features[name] for name in self.names])
        sub_logits = torch.stack([logits[name] for name in self.names])
        loss = ffl_loss(
            sub_logits,
            logits[FUSED],
            labels,
            self.hparams["temperature"],
            self.consistency_weight(),
        )
        return loss, logits
