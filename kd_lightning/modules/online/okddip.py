"""OKDDip: peers with attention-weighted targets, and a group leader distilled from them."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from kd_lightning.functional.online import attention_targets, okddip_loss, pool_features
from kd_lightning.losses.schedules import schedule_value
from kd_lightning.modules.online.peers import OnlinePeersModule, Peers
from kd_lightning.modules.optim import OptimizerFactory, SchedulerFactory

LEADER = "leader"


class OKDDipModule(OnlinePeersModule):
    """Online Knowledge Distillation with Diverse Peers (Chen, Mei, Wang, Feng, Chen, AAAI 2020).

    ``m`` peers and a group leader train together. Each peer ``a`` distils from its own target
    ``t_a = Σ_b α_ab z_b``, where ``α_ab = softmax_b((W_q h_a)ᵀ (W_k h_b))`` is attention over the
    peers' pooled features ``h`` (tapped at ``feature_layers``); the leader distils from the
    mean of the peers' logits. The loss (:func:`~kd_lightning.functional.okddip_loss`) is
    ``Σ CE + α·w(e)·Σ T²·KL`` with the ramp-up ``w(e) = exp(−5 (1 − e/ramp_epochs)²)`` over epochs.
    The targets are not detached: ``W_q`` and ``W_k`` learn only through them, as in the official
    code (DefangChen/OKDDip).

    The paper's peers are branches sharing the lower layers of one network; here they are
    separate networks (any architectures), the leader included. With ``shared_projections`` one
    ``W_q, W_k`` pair serves all peers, as in the official code (all peers' features must then
    have the same width); otherwise each peer projects its own features.

    The leader (``student``) is reported as the student (the paper deploys it); the peers are
    its teachers.

    Args:
        student: the group leader, the network reported.
        peers: the m ≥ 2 peers, named ``peer1 ... peerm`` or by the mapping's keys, or a factory
            of them (see :func:`~kd_lightning.modules.online.peers.name_peers`).
        feature_layers: the layer tapped in every peer, or one per peer.
        num_peers: with a factory, m + 1, the leader included (4: the official code's branches).
        temperature: T of the KL terms (3 in the paper).
        alpha: weight α of the distillation terms.
        ramp_epochs: epochs of the consistency ramp-up (80 in the paper, of 300).
        attention_dim: width of the projections; ``None`` is the feature width // 8 (official code).
        shared_projections: one ``W_q, W_k`` pair for all peers.
        optimizer, scheduler, scheduler_interval, batch_adapter: as in :class:`DMLModule`.

    Examples:
        >>> peer = lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> module = OKDDipModule(nn.Linear(4, 3), peer, feature_layers="1", num_peers=3)
        >>> module.materialize((torch.randn(5, 4), torch.zeros(5, dtype=torch.long)))
        >>> loss, logits = module.objective(torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))
        >>> module.teacher_names, loss.ndim
        (['peer1', 'peer2'], 0)
    """

    def __init__(
        self,
        student: nn.Module,
        peers: Peers,
        feature_layers: str | Sequence[str],
        num_peers: int = 4,
        temperature: float = 3.0,
        alpha: float = 1.0,
        ramp_epochs: int = 80,
        attention_dim: int | None = None,
        shared_projections: bool = True,
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
            student_name=LEADER,
            minimum=3,
        )
        self.save_hyperparameters(
            ignore=["student", "peers", "optimizer", "scheduler", "batch_adapter"]
        )
        self.feature_layers = self.layers_to_tap(feature_layers, self.peer_names)
        self.query_projections: nn.ModuleList | None = None
        self.key_projections: nn.ModuleList | None = None

    @property
    def peer_names(self) -> list[str]:
        """The peers' names (the leader excluded)."""
        return self.names[1:]

    def consistency_weight(self) -> float:
        """``α · exp(−5 (1 − e/ramp_epochs)²)`` at the current epoch."""
        progress = self.current_epoch / self.hparams["ramp_epochs"]
        return self.hparams["alpha"] * schedule_value("ramp_up", 0.0, 1.0, progress)

    def needs_parts(self) -> bool:
        return self.query_projections is None

    def build_parts(self, inputs: Any) -> None:
        _, features = self.tapped_forward(inputs, self.feature_layers)
        widths = {name: pool_features(features[name]).shape[1] for name in self.peer_names}
        if self.hparams["shared_projections"] and len(set(widths.values())) > 1:
            raise ValueError(
                f"shared W_q, W_k need features of one width, got {widths}: set "
                f"method.shared_projections=false or tap other layers"
            )
        dim = self.hparams["attention_dim"] or max(1, max(widths.values()) // 8)
        count = 1 if self.hparams["shared_projections"] else len(widths)
        sources = list(widths.values())[:count]
        self.query_projections = nn.ModuleList(nn.Linear(w, dim, bias=False) for w in sources)
        self.key_projections = nn.ModuleList(nn.Linear(w, dim, bias=False) for w in sources)

    def peer_attention(self, features: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Projected queries and keys ``(m, B, d)`` from the peers' tapped features."""
        if self.query_projections is None or self.key_projections is None:
            raise RuntimeError("call module.materialize(batch) (or fit) to build W_q and W_k")
        queries, keys = [], []
        for index, name in enumerate(self.peer_names):
            pooled = pool_features(features[name])
            which = 0 if len(self.query_projections) == 1 else index
            queries.append(self.query_projections[which](pooled))
            keys.append(self.key_projections[which](pooled))
        return torch.stack(queries), torch.stack(keys)

    def objective(self, inputs: Any, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits, features = self.tapped_forward(inputs, self.feature_layers)
        peer_logits = torch.stack([logits[name] for name in self.peer_names])
        queries, keys = self.peer_attention(features)
        targets = attention_targets(peer_logits, queries, keys)
        loss = okddip_loss(
            peer_logits,
            logits[LEADER],
            targets,
            labels,
            self.hparams["temperature"],
            self.consistency_weight(),
        )
        return loss, logits
