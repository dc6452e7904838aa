"""What every online method shares: named peer networks trained together, logged like teachers."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn

from kd_lightning.batch import IGNORE_INDEX
from kd_lightning.models.taps import FeatureTaps
from kd_lightning.modules.base import MethodModule
from kd_lightning.modules.epoch_means import Stage
from kd_lightning.modules.optim import OptimizerFactory, SchedulerFactory

#: The networks that train with the student: one, a list, a ``name → network`` mapping, or a
#: factory (a model class, a Hydra partial of a model config) called for each of the others.
Peers = nn.Module | Sequence[nn.Module] | Mapping[str, nn.Module] | Callable[[], nn.Module]


def name_peers(
    student: nn.Module,
    peers: Peers,
    num_peers: int = 2,
    student_name: str = "peer0",
    minimum: int = 2,
) -> dict[str, nn.Module]:
    """The group, the student first: ``{student_name: student, "peer1": ..., "peer2": ...}``.

    Peers given as one network or a list are named ``peer1, peer2, ...``; a mapping keeps its
    names; a factory is called ``num_peers − 1`` times (``num_peers`` counts the student and is
    read only then). Refuses a group of fewer than ``minimum`` networks.

    Examples:
        >>> list(name_peers(nn.Linear(2, 2), lambda: nn.Linear(2, 2), num_peers=3).keys())
        ['peer0', 'peer1', 'peer2']
        >>> list(name_peers(nn.Linear(2, 2), {"wide": nn.Linear(2, 2)}, student_name="leader"))
        ['leader', 'wide']
    """
    if isinstance(peers, nn.Module) and not isinstance(peers, nn.ModuleList | nn.ModuleDict):
        others = {"peer1": peers}
    elif isinstance(peers, Mapping | nn.ModuleDict):
        others = dict(peers.items())
    elif isinstance(peers, Sequence | nn.ModuleList) and not isinstance(peers, str):
        others = {f"peer{index}": peer for index, peer in enumerate(peers, start=1)}
    elif callable(peers):
        if isinstance(num_peers, bool) or not isinstance(num_peers, int) or num_peers < minimum:
            raise ValueError(
                f"num_peers must be an integer ≥ {minimum} (the student included), got "
                f"{num_peers!r}"
            )
        others = {f"peer{index}": peers() for index in range(1, num_peers)}
    else:
        raise TypeError(
            f"peers must be networks, a name → network mapping or a factory, got {peers!r}"
        )
    if len(others) + 1 < minimum:
        raise ValueError(
            f"peers lists {len(others)} network(s) besides the student: this method trains at "
            f"least {minimum} networks together"
        )
    for name in others:
        if not name.isidentifier() or name == student_name:
            raise ValueError(
                f"peers: names must be identifiers other than {student_name!r}, got {name!r}"
            )
    return {student_name: student, **others}


def token_rows(values: Tensor, labels: Tensor) -> Tensor:
    """``values`` at the labelled positions: unchanged for one label per sample (``labels``
    ``(B,)``); for sequences (``labels`` ``(B, L)``, ``-100`` where nothing is predicted) the rows
    of the real tokens, ``(N, *)`` from ``(B, L, *)``, so that a per-sample objective becomes a
    per-token one.

    Examples:
        >>> labels = torch.tensor([[3, 1, -100]])
        >>> token_rows(torch.arange(6.0).reshape(1, 3, 2), labels).tolist(), token_rows(labels, labels).tolist()
        ([[0.0, 1.0], [2.0, 3.0]], [3, 1])
    """
    return values if labels.ndim == 1 else values[labels != IGNORE_INDEX]


def layers_per_peer(layers: str | Sequence[str], names: Sequence[str]) -> dict[str, str]:
    """One tapped layer per peer: the same name for all, or one per peer in order.

    Examples:
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


class OnlinePeersModule(MethodModule):
    """Base of the online methods: the student and its peers, trained together.

    ``student`` is network 0, the one reported and deployed; every other output is logged as one
    of its teachers. Peers come as ``peers`` (see :func:`name_peers`): networks, or a factory
    called for ``num_peers − 1`` independently initialised others (``kd-train``'s default: copies
    of ``cfg.student``). No pretrained teacher: an online method takes no ``teachers``.

    Subclasses implement :meth:`objective` (loss and every network's logits for one batch) and,
    when they build parts whose shapes depend on the peers' features, :meth:`build_parts`, run
    once on a real batch before the optimizers are made (``setup("fit")`` does it from
    ``trainer.datamodule``; call :meth:`materialize` yourself otherwise).

    Each step returns ``student_logits`` (the first network, detached), ``teacher_logits``
    ``(K, B, C)`` of the other outputs named in :attr:`teacher_names` (detached) and ``labels``,
    so :class:`~kd_lightning.callbacks.TeacherAgreementCallback` logs every peer like a teacher.
    Logged as epoch means (:class:`~kd_lightning.modules.epoch_means.EpochMeans`):
    ``{stage}/loss``, ``{stage}/ce`` and ``{stage}/acc`` (the first network's cross-entropy and
    accuracy on the labels), ``{stage}/peer_acc/{name}`` for every output, and ``{stage}/{name}``
    for each of ``extra_means`` a step passes to :meth:`report`.

    A method that sets ``token_level`` trains language models too: it runs its peers through
    :meth:`peer_logits`, which keeps the real tokens' rows of sequence outputs (:func:`token_rows`),
    so its per-sample objective is averaged over real tokens, and the logged means and the
    callbacks' outputs are per token.

    Args:
        student: network 0, reported as the student.
        peers: the other networks, or a factory of them (see :func:`name_peers`).
        num_peers: with a factory, how many networks train together, the student included.
        optimizer, scheduler, scheduler_interval, batch_adapter: as for
            :class:`~kd_lightning.modules.base.MethodModule`.
        extra_outputs: names of outputs besides the networks' (e.g. a fused classifier's).
        extra_means: names of the extra scalars steps pass to :meth:`report`.
        student_name: the student's name among the peers.
        minimum: the fewest networks the method trains together.

    Examples:
        >>> from kd_lightning.functional import dml_losses
        >>> class Mutual(OnlinePeersModule):
        ...     def objective(self, inputs, labels):
        ...         logits = {name: peer(inputs) for name, peer in self.peers.items()}
        ...         return dml_losses(torch.stack(list(logits.values())), labels).sum(), logits
        >>> Mutual(nn.Linear(4, 3), [nn.Linear(4, 3)]).teacher_names
        ['peer1']
    """

    def __init__(
        self,
        student: nn.Module,
        peers: Peers,
        num_peers: int = 2,
        optimizer: OptimizerFactory = torch.optim.Adam,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
        batch_adapter: Callable[[Any], tuple[Any, Tensor]] | None = None,
        extra_outputs: Sequence[str] = (),
        extra_means: Sequence[str] = (),
        student_name: str = "peer0",
        minimum: int = 2,
    ) -> None:
        named = name_peers(student, peers, num_peers, student_name, minimum)
        output_names = [*named, *extra_outputs]
        super().__init__(
            ("loss", "ce", "acc", *(f"peer_acc/{name}" for name in output_names), *extra_means),
            optimizer,
            scheduler,
            scheduler_interval,
            batch_adapter,
        )
        self.peers = nn.ModuleDict(named)
        self.output_names = output_names
        self.extra_means = list(extra_means)

    @property
    def names(self) -> list[str]:
        """The peers' names; the first is the reported network."""
        return list(self.peers.keys())

    @property
    def student(self) -> nn.Module:
        """Network 0, the one reported."""
        return self.peers[self.names[0]]

    @property
    def teacher_names(self) -> list[str]:
        """The outputs logged as teachers: every output but the reported network's."""
        return self.output_names[1:]

    def objective(self, inputs: Any, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss on one batch and the logits of every name in ``output_names``."""
        raise NotImplementedError

    def peer_logits(
        self, inputs: Any, labels: Tensor, peers: Mapping[str, nn.Module] | None = None
    ) -> dict[str, Tensor]:
        """Every peer's logits (of ``peers``, by default the module's) on ``inputs``, at the
        labelled positions: the real tokens' rows ``(N, V)`` for sequences (:func:`token_rows`)."""
        chosen = (self.peers if peers is None else peers).items()
        return {name: token_rows(peer(inputs), labels) for name, peer in chosen}

    def build_parts(self, inputs: Any) -> None:
        """Create the parts whose shapes depend on the peers' outputs (no-op by default)."""

    def needs_parts(self) -> bool:
        """Whether :meth:`build_parts` still has to run."""
        return False

    def step(self, batch: Any, stage: Stage) -> dict[str, Tensor]:
        inputs, labels = self.batch_adapter(batch)
        loss, logits = self.objective(inputs, labels)
        return self.report(stage, loss, logits, labels)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage != "fit" or not self.needs_parts():
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

    def layers_to_tap(self, layers: str | Sequence[str], names: Sequence[str]) -> dict[str, str]:
        """The layer to tap in each peer of ``names``: one name for all, or one per peer in order
        (:func:`layers_per_peer`), each checked to exist now rather than at the first step."""
        named = layers_per_peer(layers, names)
        for name, layer in named.items():
            FeatureTaps(self.peers[name], [layer]).remove()
        return named

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
        labels = token_rows(labels, labels)  # sequences: the real tokens, as the logits are
        size = float(labels.shape[0])
        reported = logits[self.output_names[0]]
        accuracies = [
            (logits[name].argmax(-1) == labels).float().mean() for name in self.output_names
        ]
        values = [
            loss,
            F.cross_entropy(reported.detach().float(), labels),
            accuracies[0],
            *accuracies,
            *(extra.get(n, loss.new_zeros(())) for n in self.extra_means),
        ]
        weights = [size] * (3 + len(accuracies)) + [
            size if name in extra else 0.0 for name in self.extra_means
        ]
        self.update_epoch_means(stage, values, weights)
        return {
            "loss": loss,
            "student_logits": reported.detach(),
            "teacher_logits": torch.stack([logits[n].detach() for n in self.teacher_names]),
            "labels": labels,
        }
