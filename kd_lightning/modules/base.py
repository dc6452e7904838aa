"""What every method's LightningModule shares: the step dispatch, the optimizers built from
factories, and the contract by which ``kd-train`` builds a method from its config."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, Literal, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LRScheduler

from kd_lightning.batch import BatchAdapter
from kd_lightning.modules.epoch_means import EpochMeans, Stage
from kd_lightning.modules.optim import OptimizerFactory, SchedulerFactory, configure_optimizers
from kd_lightning.modules.process_group import destroy_process_group_at_exit


class MethodModule(EpochMeans):
    """Base of the library's LightningModules: one :meth:`step` for every stage, optimizers built
    from factories, epoch means logged as :class:`~kd_lightning.modules.epoch_means.EpochMeans`.

    Subclasses implement :meth:`step` and hold the network they train and report as ``student``
    (an attribute or a property); ``forward`` runs it. One optimizer covers every trainable
    parameter unless a subclass overrides :meth:`configure_optimizers`, e.g. with one
    :meth:`optimizer_config` per network. Under manual optimisation (``automatic_optimization =
    False``) a subclass steps the schedules with :meth:`step_schedulers` after each batch; the
    epoch-end ones are stepped here. Such a module declares :attr:`partial_backward`: under DDP
    it needs ``DDPStrategy(find_unused_parameters=True)``, which ``kd-train`` sets from it
    (``trainer.strategy.find_unused_parameters``) and ``fit`` checks.

    **A method, as** ``kd-train`` **builds it.** ``conf/method/<name>.yaml`` is a node with
    ``_target_`` and ``_partial_: true``: a LightningModule class, or a pipeline function that runs
    earlier stages and returns the module of the last one. The shell instantiates it and calls
    the partial with what the run provides, chosen by the target's signature:

    * ``student``: always; a freshly initialised ``cfg.student``. The returned module's
      ``student`` is the network trained and reported; the scratch baseline (``baseline=true``)
      trains a copy of it as it was before training.
    * ``teachers``: only to a target with a ``teachers`` parameter, which is what makes the shell
      load (or train and cache) the configured frozen teachers, as a
      :class:`~kd_lightning.teachers.TeacherEnsemble`; with ``cache=true``, a
      :class:`~kd_lightning.teachers.CachedTeachers` instead, and a target whose constructor
      refuses one cannot read a teacher-output cache.
    * ``stages``: only to a target with a ``stages`` parameter: a
      :class:`~kd_lightning.modules.stages.StageRunner` with the run's data, its ``stages/``
      directory, trainer settings and seed.

    Everything else comes from the node itself (hyper-parameters, ``${optimizer}``,
    ``${scheduler}``, ``${fusion}``). Constructors and pipelines check their arguments before
    any work, raising ``ValueError`` that starts with the argument's name; ``kd-train`` reports
    it as ``method.<argument>`` before anything is trained.

    Args:
        names: the scalars each step adds to the epoch means (see
            :class:`~kd_lightning.modules.epoch_means.EpochMeans`).
        optimizer: called with the parameters it optimises.
        scheduler: called with each optimizer (and ``total_steps`` when it takes it), or ``None``.
        scheduler_interval: ``"step"`` or ``"epoch"``.
        batch_adapter: turns a batch into ``(inputs, labels)``; defaults to
            :class:`~kd_lightning.BatchAdapter`.

    Examples:
        >>> import torch.nn.functional as F
        >>> class Plain(MethodModule):
        ...     def __init__(self, student):
        ...         super().__init__(["loss"])
        ...         self.student = student
        ...     def step(self, batch, stage):
        ...         inputs, labels = self.batch_adapter(batch)
        ...         return F.cross_entropy(self(inputs), labels)
        >>> module = Plain(nn.Linear(4, 3))
        >>> module.validation_step((torch.randn(2, 4), torch.tensor([0, 2])), 0).ndim
        0
    """

    #: Whether the method trains on sequences too: logits ``(B, L, V)`` for labels ``(B, L)``
    #: holding ``-100`` where nothing is predicted, each loss a mean over real tokens.
    token_level: ClassVar[bool] = False

    def __init__(
        self,
        names: Sequence[str],
        optimizer: OptimizerFactory = torch.optim.Adam,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
        batch_adapter: Callable[[Any], tuple[Any, Tensor]] | None = None,
    ) -> None:
        super().__init__(names)
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(
                f"scheduler_interval must be 'step' or 'epoch', got {scheduler_interval!r}"
            )
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.batch_adapter = batch_adapter if batch_adapter is not None else BatchAdapter()

    def setup(self, stage: str) -> None:
        if dist.is_available() and dist.is_initialized():
            destroy_process_group_at_exit()

    def forward(self, inputs: Any) -> Tensor:
        """The student's logits."""
        return cast(nn.Module, self.student)(inputs)

    def step(self, batch: Any, stage: Stage) -> Any:
        """One batch of ``stage``: adds to the epoch means and returns the step's outputs (the loss,
        or a dict with ``"loss"`` and what callbacks read)."""
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return self.step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        return self.step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Any:
        return self.step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs, _ = self.batch_adapter(batch)
        return self(inputs)

    def configure_optimizers(self) -> Any:
        return self.optimizer_config(self.parameters())

    def optimizer_config(
        self, parameters: Iterable[nn.Parameter], factory: OptimizerFactory | None = None
    ) -> dict[str, Any]:
        """One optimizer (``factory``, by default the module's) over the trainable ``parameters``,
        with its schedule, as Lightning's ``{"optimizer": ..., "lr_scheduler": ...}``."""
        built = configure_optimizers(
            parameters,
            factory or self.optimizer_factory,
            self.scheduler_factory,
            total_steps=int(self.trainer.estimated_stepping_batches),
            interval=self.scheduler_interval,
        )
        return built if isinstance(built, dict) else {"optimizer": built}

    def step_schedulers(self, end_of_epoch: bool) -> None:
        """Advance the schedules under manual optimisation (Lightning does not): call it with
        ``False`` after each batch; epoch ends are handled here."""
        if (self.scheduler_interval == "epoch") != end_of_epoch:
            return
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
            cast(LRScheduler, scheduler).step()

    @property
    def partial_backward(self) -> bool:
        """Whether a backward pass may reach only part of the trainable parameters (one network,
        or one phase of an alternating update): under manual optimisation. DDP must then look for
        unused parameters (``DDPStrategy(find_unused_parameters=True)``).

        Examples:
            >>> class Alternating(MethodModule):
            ...     def __init__(self):
            ...         super().__init__(["loss"])
            ...         self.automatic_optimization = False
            >>> Alternating().partial_backward
            True
        """
        return not self.automatic_optimization

    def on_fit_start(self) -> None:
        model = self.trainer.strategy.model
        if (
            self.partial_backward
            and isinstance(model, DistributedDataParallel)
            and not model.find_unused_parameters
        ):
            raise RuntimeError(
                f"trainer.strategy.find_unused_parameters: {type(self).__name__} back-propagates "
                "losses that reach only part of its parameters (one network or phase at a time), "
                "so DDP must run with find_unused_parameters=True: set "
                "trainer.strategy.find_unused_parameters=true (or null) in kd-train, or pass "
                "DDPStrategy(find_unused_parameters=True) to the Trainer"
            )

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if not self.automatic_optimization:
            self.step_schedulers(end_of_epoch=True)
