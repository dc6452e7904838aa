"""Codistillation: peers distil from stale snapshots of each other, after a burn-in."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from kd_lightning.functional.online import codistillation_loss
from kd_lightning.modules.online.peers import OnlinePeersModule, Peers, token_rows
from kd_lightning.modules.optim import OptimizerFactory, SchedulerFactory

_CHECKPOINT_KEY = "codistillation_snapshots"


class CodistillationModule(OnlinePeersModule):
    """Codistillation (Anil, Pereyra, Passos, Ormandi, Dahl, Hinton, "Large scale distributed
    neural network training through online distillation", ICLR 2018).

    Peer ``i`` minimises ``CE(y, F_i) + w · CE(mean_{j≠i} F(θ̃_j), F_i)``
    (:func:`~kd_lightning.functional.codistillation_loss`), where ``θ̃_j`` are *stale* copies of the
    other peers: frozen snapshots (eval mode, no gradients) taken every ``refresh_every`` optimizer
    steps. Distillation is switched on after ``burn_in`` steps, when the first snapshots are
    taken; before, each peer trains on labels alone. The snapshots are kept in checkpoints, so a
    resumed run distils from the same stale peers. All peers share one optimizer (their losses
    are independent, so this equals one optimizer per peer).

    The paper's peers train on different data shards and exchange checkpoints rarely, which is
    what makes staleness cheap at scale. By default every peer sees every batch. With
    ``sharded=True`` under DDP, peer ``i`` trains only on the shards of the ranks ``r`` with
    ``r mod N = i`` (the world size must be a multiple of N): on the other ranks its loss is
    weighted 0, on its own ranks ``N``, so that DDP's average over all ranks is the average over
    its own. Parameters stay synchronised by DDP, so every rank holds the same snapshots; peers
    exchange their weights every step rather than rarely, which the paper's setting allows but
    does not need.

    ``student`` (peer 0) is reported as the student; the others are logged as its teachers
    (their live predictions, not the snapshots). ``{stage}/loss`` is the sum of the peers' losses
    (weighted by shard in sharded training).

    Args:
        student: peer 0, the network reported.
        peers: the other networks, or a factory of them (see
            :func:`~kd_lightning.modules.online.peers.name_peers`).
        num_peers: with a factory, N, the student included.
        refresh_every: optimizer steps between snapshot refreshes.
        burn_in: optimizer steps of plain cross-entropy before distillation starts.
        distill_weight: weight ``w`` of the distillation term.
        sharded: under DDP, train each peer on its own ranks' shards only.
        optimizer: called with all peers' parameters.
        scheduler: called with the optimizer (and ``total_steps``), or ``None``.
        scheduler_interval: ``"step"`` or ``"epoch"``.
        batch_adapter: turns a batch into ``(inputs, labels)``.

    Examples:
        >>> module = CodistillationModule(nn.Linear(4, 3), nn.Linear(4, 3), burn_in=0)
        >>> module.refresh_snapshots()
        >>> loss, _ = module.objective(torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))
        >>> loss.ndim, module.distilling
        (0, True)
    """

    token_level = True

    def __init__(
        self,
        student: nn.Module,
        peers: Peers,
        num_peers: int = 2,
        refresh_every: int = 10,
        burn_in: int = 30,
        distill_weight: float = 1.0,
        sharded: bool = False,
        optimizer: OptimizerFactory = torch.optim.Adam,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
        batch_adapter: Callable[[Any], tuple[Any, Tensor]] | None = None,
    ) -> None:
        if refresh_every < 1:
            raise ValueError(
                f"refresh_every must be a positive number of steps, got {refresh_every}"
            )
        if burn_in < 0:
            raise ValueError(f"burn_in must be ≥ 0 steps, got {burn_in}")
        super().__init__(
            student, peers, num_peers, optimizer, scheduler, scheduler_interval, batch_adapter
        )
        self.save_hyperparameters(
            ignore=["student", "peers", "optimizer", "scheduler", "batch_adapter"]
        )
        self._snapshots: dict[str, nn.Module] = {}  # not submodules: never optimised
        self._snapshot_step = -1

    @property
    def distilling(self) -> bool:
        """Whether stale snapshots exist, i.e. the distillation term is on."""
        return bool(self._snapshots)

    def refresh_snapshots(self) -> None:
        """Replace the stale copies with frozen copies of the current peers."""
        self._snapshots = {name: _frozen_copy(peer) for name, peer in self.peers.items()}
        self._snapshot_step = self.global_step

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        step = self.global_step
        if step < self.hparams["burn_in"]:
            return
        if not self.distilling or step - self._snapshot_step >= self.hparams["refresh_every"]:
            self.refresh_snapshots()

    def setup(self, stage: str) -> None:
        super().setup(stage)
        world_size, peers = self.trainer.world_size, len(self.names)
        if stage == "fit" and self.hparams["sharded"] and world_size % peers:
            raise ValueError(
                f"method.sharded=true trains each of the {peers} peers on its own ranks: the "
                f"world size ({world_size}) must be a multiple of {peers}"
            )

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        inputs, labels = self.batch_adapter(batch)
        losses, logits = self.peer_losses(inputs, labels)
        if self.hparams["sharded"]:
            weights = shard_weights(len(self.names), self.trainer.world_size, self.global_rank)
            losses = losses * losses.new_tensor(weights)
        return self.report("train", losses.sum(), logits, labels)

    def objective(self, inputs: Any, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        losses, logits = self.peer_losses(inputs, labels)
        return losses.sum(), logits

    def peer_losses(self, inputs: Any, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Each peer's loss ``(N,)`` and logits."""
        logits = self.peer_logits(inputs, labels)
        stale = self._stale_logits(inputs, labels)
        rows = token_rows(labels, labels)
        losses = []
        for name in self.names:
            others = None if stale is None else torch.stack([stale[o] for o in stale if o != name])
            losses.append(
                codistillation_loss(logits[name], others, rows, self.hparams["distill_weight"])
            )
        return torch.stack(losses), logits

    def _stale_logits(self, inputs: Any, labels: Tensor) -> dict[str, Tensor] | None:
        if not self._snapshots:
            return None
        snapshots = {name: snapshot.to(self.device) for name, snapshot in self._snapshots.items()}
        with torch.no_grad():
            return self.peer_logits(inputs, labels, snapshots)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[_CHECKPOINT_KEY] = {
            "step": self._snapshot_step,
            "state": {name: snap.state_dict() for name, snap in self._snapshots.items()},
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(_CHECKPOINT_KEY)
        if not saved or not saved["state"]:
            return
        self._snapshots = {}
        for name, state in saved["state"].items():
            snapshot = _frozen_copy(self.peers[name])
            snapshot.load_state_dict(state)
            self._snapshots[name] = snapshot
        self._snapshot_step = saved["step"]


def shard_weights(num_peers: int, world_size: int, rank: int) -> list[float]:
    """Loss weights of the peers on ``rank``: ``num_peers`` for the peer this rank trains
    (``rank mod num_peers``), 0 for the others.

    Examples:
        >>> shard_weights(num_peers=2, world_size=4, rank=3)
        [0.0, 2.0]
    """
    if world_size % num_peers:
        raise ValueError(f"world size {world_size} is not a multiple of {num_peers} peers")
    return [float(num_peers) if rank % num_peers == i else 0.0 for i in range(num_peers)]


def _frozen_copy(peer: nn.Module) -> nn.Module:
    snapshot = copy.deepcopy(peer).eval()
    snapshot.requires_grad_(False)
    return snapshot
