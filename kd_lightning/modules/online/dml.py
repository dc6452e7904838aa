"""Deep mutual learning: K peers, each distilling from the others' detached predictions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from kd_lightning.functional.online import PeerReduction, dml_losses, dml_peer_loss
from kd_lightning.modules.online.peers import OnlinePeersModule, Peers, token_rows
from kd_lightning.modules.optim import OptimizerFactory, SchedulerFactory

Update = Literal["sequential", "simultaneous"]


class DMLModule(OnlinePeersModule):
    """Deep Mutual Learning (Zhang, Xiang, Hospedales, Lu, "Deep Mutual Learning", CVPR 2018).

    Peer ``k`` minimises ``CE(y, p_k) + c · Σ_{l≠k} T²·KL(sg p_l ‖ p_k)`` (see
    :func:`~kd_lightning.functional.dml_peer_loss`), with ``c = 1/(K − 1)`` (the paper) or ``1``
    (``peer_reduction="sum"``, the official TensorFlow code).

    ``update="sequential"`` follows the paper's Algorithm 1: peer 1 steps, then peer 2 computes its
    loss against peer 1's *updated* predictions (peer 1 is run again on the batch), and so on; each
    peer has its own optimizer and schedule (manual optimisation). ``"simultaneous"`` follows the
    official code: one forward pass of all peers, one optimizer over all of them, the sum of the
    peers' losses (the targets are detached, so each peer gets exactly its own loss's gradient).

    ``student`` (peer 0) is reported as the student; the others are logged as its teachers. The
    logged ``{stage}/loss`` is the sum of the peers' losses (before the updates, for sequential
    training).

    Args:
        student: peer 0, the network reported.
        peers: the other networks, named ``peer1, peer2, ...`` or by the mapping's keys, or a
            factory of them (see :func:`~kd_lightning.modules.online.peers.name_peers`).
        num_peers: with a factory, K, the student included.
        temperature: softmax temperature of the KL terms (1 in the paper).
        peer_reduction: ``"mean"`` (1/(K − 1)) or ``"sum"`` over the other peers.
        update: ``"sequential"`` or ``"simultaneous"``.
        optimizer: called with a peer's parameters (sequential) or all of them (simultaneous).
        scheduler: called with each optimizer (and ``total_steps``), or ``None``.
        scheduler_interval: ``"step"`` or ``"epoch"``.
        batch_adapter: turns a batch into ``(inputs, labels)``.

    Examples:
        >>> module = DMLModule(nn.Linear(4, 3), nn.Linear(4, 3), update="simultaneous")
        >>> loss, logits = module.objective(torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))
        >>> module.teacher_names, logits["peer0"].shape
        (['peer1'], torch.Size([5, 3]))
    """

    token_level = True

    def __init__(
        self,
        student: nn.Module,
        peers: Peers,
        num_peers: int = 2,
        temperature: float = 1.0,
        peer_reduction: PeerReduction = "mean",
        update: Update = "sequential",
        optimizer: OptimizerFactory = torch.optim.Adam,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
        batch_adapter: Callable[[Any], tuple[Any, Tensor]] | None = None,
    ) -> None:
        if update not in ("sequential", "simultaneous"):
            raise ValueError(f"update must be 'sequential' or 'simultaneous', got {update!r}")
        if peer_reduction not in ("mean", "sum"):
            raise ValueError(f"peer_reduction must be 'mean' or 'sum', got {peer_reduction!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        super().__init__(
            student, peers, num_peers, optimizer, scheduler, scheduler_interval, batch_adapter
        )
        self.save_hyperparameters(
            ignore=["student", "peers", "optimizer", "scheduler", "batch_adapter"]
        )
        self.automatic_optimization = update == "simultaneous"

    def objective(self, inputs: Any, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.peer_logits(inputs, labels)
        losses = dml_losses(
            torch.stack(list(logits.values())),
            token_rows(labels, labels),
            self.hparams["temperature"],
            self.hparams["peer_reduction"],
        )
        return losses.sum(), logits

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        if self.automatic_optimization:
            return super().training_step(batch, batch_idx)
        inputs, labels = self.batch_adapter(batch)
        optimizers = self.optimizers()
        logits = self.peer_logits(inputs, labels)
        targets = {name: z.detach() for name, z in logits.items()}
        rows = token_rows(labels, labels)
        total = torch.zeros((), device=labels.device)
        for index, (name, optimizer) in enumerate(zip(self.names, optimizers, strict=True)):
            others = torch.stack([targets[other] for other in self.names if other != name])
            loss = dml_peer_loss(
                logits[name],
                others,
                rows,
                self.hparams["temperature"],
                self.hparams["peer_reduction"],
            )
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
            total = total + loss.detach()
            if index < len(self.names) - 1:  # later peers learn from this peer's update
                with torch.no_grad():
                    targets[name] = token_rows(self.peers[name](inputs), labels)
        self.step_schedulers(end_of_epoch=False)
        return self.report("train", total, logits, labels)

    def configure_optimizers(self) -> Any:
        if self.automatic_optimization:
            return super().configure_optimizers()
        return [self.optimizer_config(peer.parameters()) for peer in self.peers.values()]
