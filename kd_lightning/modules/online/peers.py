"""What every online method shares: named peer networks trained together, logged like teachers."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, cast

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler

from kd_lightning.batch import BatchAdapter
from kd_lightning.models.taps import FeatureTaps
from kd_lightning.modules.epoch_means import EpochMeans, Stage
from kd_lightning.modules.optim import OptimizerFactory, SchedulerFactory, configure_optimizers


def name_peers(peers: Sequence[nn.Module] | Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """``{"peer0": ..., "peer1": ...}`` for a sequence; a mapping keeps its names.

    Example:
        >>> list(name_peers([nn.Linear(2, 2), nn.Linear(2, 2)]))
        ['peer0', 'peer1']
    """
    named = (
        dict(peers) if isinstance(peers, Mapping) else {f"peer{i}": p for i, p in enumerate(peers)}
    )
    for name in named:
        if not name.isidentifier():
            raise ValueError(f"peer names must be identifiers, got {name!r}")
    return named


def layers_per_peer(layers: str | Sequence[str], names: Sequence[str]) -> dict[str, str]:
    """One tapped layer per peer: the same name for all, or one per peer in order.

    Example:
        >>> layers_per_peer("hidden", ["peer0", "peer1"])
        {'peer0': 'hidden', 'peer1': 'hidden'}
    """
    if isinstance(layers, str):
        return dict.fromkeys(names, layers)
    layers = list(layers)
    if len(layers) != len(names):
        raise ValueError(
            f"feature_layers lists {len(layers)} layer(s) {layers} for {len(names)} peers "
            f"{list(names)}: name one layer for all peers, or one per peer"
        )
    return dict(zip(names, layers, strict=True))


def allow_partial_backward(strategy: Any) -> None:
    """Let DDP reduce gradients when a backward pass reaches only some parameters (one peer, or
    one phase of an alternating update), as ``strategy=ddp_find_unused_parameters_true`` would.

    Lightning's DDP strategy keeps the ``DistributedDataParallel`` arguments in ``_ddp_kwargs``
    until it wraps the model, after the module's ``setup``.

    Example:
        >>> strategy = DDPStrategy()
        >>> allow_partial_backward(strategy)
        >>> strategy._ddp_kwargs
        {'find_unused_parameters': True}
    """
    kwargs = getattr(strategy, "_ddp_kwargs", None)
    if isinstance(strategy, DDPStrategy) and isinstance(kwargs, dict):
        kwargs["find_unused_parameters"] = True


class OnlinePeersModule(EpochMeans):
    """Base of the online methods: peers (the first one reported as the student) trained together.

    Subclasses implement :meth:`objective` (loss and every network's logits for one batch) and,
    when they build parts whose shapes depend on the peers' features, :meth:`build_parts`, run
    once on a real batch before the optimizers are made (``setup("fit")`` does it from
    ``trainer.datamodule``; call :meth:`materialize` yourself otherwise).

    Each step returns ``student_logits`` (the first network, detached), ``teacher_logits``
    ``(K, B, C)`` of the other outputs named in :attr:`teacher_names` (detached) and ``labels``,
    so :class:`~kd_lightning.callbacks.TeacherAgreementCallback` logs every peer like a teacher.
    Logged as epoch means (:class:`~kd_lightning.modules.epoch_means.EpochMeans`):
    ``{stage}/loss``, ``{stage}/acc`` (the first network), ``{stage}/peer_acc/{name}`` for every
    output, and ``{stage}/{name}`` for each of ``extra_means`` a step passes to :meth:`report`.

    Example:
        >>> from kd_lightning.functional import dml_losses
        >>> class Mutual(OnlinePeersModule):
        ...     def objective(self, inputs, labels):
        ...         logits = {name: peer(inputs) for name, peer in self.peers.items()}
        ...         return dml_losses(torch.stack(list(logits.values())), labels).sum(), logits
        >>> Mutual([nn.Linear(4, 3), nn.Linear(4, 3)]).teacher_names
        ['peer1']
    """

    def __init__(
        self,
        peers: Sequence[nn.Module] | Mapping[str, nn.Module],
        optimizer: OptimizerFactory = torch.optim.Adam,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
        batch_adapter: Callable[[Any], tuple[Any, Tensor]] | None = None,
        extra_outputs: Sequence[str] = (),
        extra_means: Sequence[str] = (),
    ) -> None:
        named = name_peers(peers)
        if len(named) < 2:
            raise ValueError(f"online distillation needs at least 2 peers, got {len(named)}")
        output_names = [*named, *extra_outputs]
        super().__init__(
            ("loss", "acc", *(f"peer_acc/{name}" for name in output_names), *extra_means)
        )
        self.peers = nn.ModuleDict(named)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.batch_adapter = batch_adapter if batch_adapter is not None else BatchAdapter()
        self.output_names = output_names
        self.extra_means = list(extra_means)

    @property
    def names(self) -> list[str]:
        """The peers' names; the first is the reported network."""
        return list(self.peers.keys())

    @property
    def teacher_names(self) -> list[str]:
        """The outputs logged as teachers: every output but the reported network's."""
        return self.output_names[1:]

    def forward(self, inputs: Any) -> Tensor:
        """The reported network's logits."""
        return self.peers[self.names[0]](inputs)

    def objective(self, inputs: Any, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss on one batch and the logits of every name in ``output_names``."""
        raise NotImplementedError

    def build_parts(self, inputs: Any) -> None:
        """Create the parts whose shapes depend on the peers' outputs (no-op by default)."""

    def needs_parts(self) -> bool:
        """Whether :meth:`build_parts` still has to run."""
        return False

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        inputs, labels = self.batch_adapter(batch)
        loss, logits = self.objective(inputs, labels)
        return self.report("train", loss, logits, labels)

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs, _ = self.batch_adapter(batch)
        return self(inputs)

    def _evaluate(self, batch: Any, stage: Stage) -> dict[str, Tensor]:
        inputs, labels = self.batch_adapter(batch)
        loss, logits = self.objective(inputs, labels)
        return self.report(stage, loss, logits, labels)

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        if not self.automatic_optimization:
            allow_partial_backward(self.trainer.strategy)
        if not self.needs_parts():
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            raise RuntimeError(
                f"{type(self).__name__} builds parts shaped by the peers' features before the "
                f"optimizers exist: fit with a datamodule, or call module.materialize(batch) first"
            )
        self.materialize(next(iter(datamodule.train_dataloader())))

    def materialize(self, batch: Any) -> None:
        """Run :meth:`build_parts` on one batch (peers in eval mode, no gradients)."""
        if not self.needs_parts():
            return
        device = next(self.peers.parameters()).device
        inputs, _ = self.batch_adapter(move_data_to_device(batch, device))
        modes = {module: module.training for module in self.modules()}
        self.eval()
        with torch.no_grad():
            self.build_parts(inputs)
        for module, training in modes.items():
            module.train(training)
        self.to(device)

    def tapped_forward(
        self, inputs: Any, layers: Mapping[str, str]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Every peer's logits and, for peers named in ``layers``, the output of that layer."""
        logits, features = {}, {}
        for name, peer in self.peers.items():
            if name not in layers:
                logits[name] = peer(inputs)
                continue
            with FeatureTaps(peer, [layers[name]]) as taps:
                logits[name] = peer(inputs)
            features[name] = taps[layers[name]]
        return logits, features

    def report(
        self,
        stage: Stage,
        loss: Tensor,
        logits: Mapping[str, Tensor],
        labels: Tensor,
        extra: Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Add loss, accuracies and the ``extra`` means (those of ``extra_means`` this step has;
        the others count for nothing) to the epoch means; the step's outputs for callbacks."""
        extra = extra or {}
        size = float(labels.shape[0])
        reported = logits[self.output_names[0]]
        accuracies = [
            (logits[name].argmax(-1) == labels).float().mean() for name in self.output_names
        ]
        values = [
            loss,
            accuracies[0],
            *accuracies,
            *(extra.get(n, loss.new_zeros(())) for n in self.extra_means),
        ]
        weights = [size] * (2 + len(accuracies)) + [
            size if name in extra else 0.0 for name in self.extra_means
        ]
        self.update_epoch_means(stage, values, weights)
        return {
            "loss": loss,
            "student_logits": reported.detach(),
            "teacher_logits": torch.stack([logits[n].detach() for n in self.teacher_names]),
            "labels": labels,
        }

    def optimizers_for(
        self, groups: Iterable[Iterable[nn.Parameter]], factory: OptimizerFactory | None = None
    ) -> list[dict[str, Any]]:
        """One optimizer (``factory``, by default the module's) with its schedule per parameter
        group, in Lightning's list-of-dicts form."""
        configured = []
        for parameters in groups:
            built = configure_optimizers(
                parameters,
                factory or self.optimizer_factory,
                self.scheduler_factory,
                total_steps=int(self.trainer.estimated_stepping_batches),
                interval=self.scheduler_interval,
            )
            configured.append(built if isinstance(built, dict) else {"optimizer": built})
        return configured

    def configure_optimizers(self) -> Any:
        return self.optimizers_for([self.parameters()])[0]

    def step_schedulers(self, end_of_epoch: bool) -> None:
        """Advance the schedules under manual optimisation (Lightning does not)."""
        if (self.scheduler_interval == "epoch") != end_of_epoch:
            return
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
            cast(LRScheduler, scheduler).step()
