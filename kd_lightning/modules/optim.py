"""Optimizer and learning-rate schedule plumbing shared by every module."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

OptimizerFactory = Callable[[Iterable[nn.Parameter]], Optimizer]
SchedulerFactory = Callable[..., LRScheduler]


def cosine_schedule(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0) -> LambdaLR:
    """Linear warm-up, then cosine decay to zero over ``total_steps`` optimizer steps.

    Modules pass ``total_steps`` themselves (the trainer's estimated stepping batches), so a config
    only names the function: ``{_target_: kd_lightning.modules.optim.cosine_schedule, _partial_: true}``.

    Examples:
        >>> import torch
        >>> optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> schedule = cosine_schedule(optimizer, total_steps=4)
        >>> [round(schedule.get_last_lr()[0], 3) for _ in range(4) if not schedule.step()]
        [0.854, 0.5, 0.146, 0.0]
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be positive, got {total_steps}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def step_schedule(
    optimizer: Optimizer,
    total_steps: int,
    milestones: Sequence[float] = (0.25, 0.5),
    gamma: float = 0.1,
) -> LambdaLR:
    """Multiply the learning rate by ``gamma`` at each milestone, given as a fraction of the
    ``total_steps`` optimizer steps (so that one config serves runs of any length).

    AFD's adversarial optimizers use it (:class:`~kd_lightning.modules.AFDModule`). A config
    names the function and its milestones:
    ``{_target_: kd_lightning.modules.optim.step_schedule, _partial_: true, milestones: [0.5]}``.

    Examples:
        >>> import torch
        >>> optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> schedule = step_schedule(optimizer, total_steps=4)
        >>> rates = []
        >>> for _ in range(4):
        ...     optimizer.step()
        ...     schedule.step()
        ...     rates.append(round(schedule.get_last_lr()[0], 3))
        >>> rates
        [0.1, 0.01, 0.01, 0.01]
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if any(not 0 <= milestone <= 1 for milestone in milestones):
        raise ValueError(f"milestones must be fractions of training in [0, 1], got {milestones}")
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    steps = [milestone * total_steps for milestone in milestones]

    def factor(step: int) -> float:
        return float(gamma ** sum(step >= at for at in steps))

    return LambdaLR(optimizer, factor)


def configure_optimizers(
    parameters: Iterable[nn.Parameter],
    optimizer: OptimizerFactory,
    scheduler: SchedulerFactory | None,
    total_steps: int,
    interval: str = "step",
) -> Any:
    """Build what ``LightningModule.configure_optimizers`` returns from two factories.

    ``scheduler`` receives ``total_steps`` when it takes an argument of that name.
    """
    built = optimizer([p for p in parameters if p.requires_grad])
    if scheduler is None:
        return built
    if "total_steps" in inspect.signature(scheduler).parameters:
        schedule = scheduler(built, total_steps=total_steps)
    else:
        schedule = scheduler(built)
    return {"optimizer": built, "lr_scheduler": {"scheduler": schedule, "interval": interval}}


class JointOptimizer(Optimizer):
    """Several optimizers, each over its own parameters, stepped, zeroed and saved as one.

    Lightning's automatic optimisation takes one optimizer per module; a joint optimizer lets a
    part of the module train with its own optimizer class and settings (AMTML-KD's gate with SGD
    while the student uses Adam, :class:`~kd_lightning.DistillationModule`). ``param_groups``
    lists the inner optimizers' groups themselves, so gradient clipping, mixed precision's
    unscaling and learning-rate monitors see every parameter; a schedule of one inner optimizer
    is registered with :class:`JointSchedule`.

    Examples:
        >>> import torch
        >>> a, b = nn.Parameter(torch.ones(1)), nn.Parameter(torch.ones(1))
        >>> joint = JointOptimizer([torch.optim.SGD([a], lr=0.5), torch.optim.Adam([b], lr=0.1)])
        >>> (a + b).sum().backward()
        >>> joint.step()
        >>> round(a.item(), 3), round(b.item(), 3), len(joint.param_groups)
        (0.5, 0.9, 2)
    """

    def __init__(self, optimizers: Sequence[Optimizer]) -> None:
        parameters = [p for o in optimizers for g in o.param_groups for p in g["params"]]
        if not parameters:
            raise ValueError("JointOptimizer needs optimizers with parameters")
        if len({id(p) for p in parameters}) != len(parameters):
            raise ValueError("JointOptimizer: a parameter is held by two of the optimizers")
        super().__init__(parameters, {})
        self.optimizers = list(optimizers)
        self._share_inner_groups()

    def _share_inner_groups(self) -> None:
        """Point ``param_groups`` and ``state`` at the inner optimizers' own (their
        ``load_state_dict`` replaces the groups)."""
        self.param_groups = [group for o in self.optimizers for group in o.param_groups]
        self.state = _InnerStates(self.optimizers)  # type: ignore[assignment]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict["optimizers"]
        if len(states) != len(self.optimizers):
            raise ValueError(
                f"JointOptimizer holds {len(self.optimizers)} optimizers, the state {len(states)}"
            )
        for optimizer, state in zip(self.optimizers, states, strict=True):
            optimizer.load_state_dict(state)
        self._share_inner_groups()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "optimizers"):  # after __init__: no inner optimizer would step it
            raise TypeError("JointOptimizer: add the group to one of its inner optimizers")
        super().add_param_group(param_group)


class JointSchedule(LRScheduler):
    """A schedule of one optimizer inside a :class:`JointOptimizer`, registered under the joint
    optimizer so that Lightning steps and checkpoints it (Lightning accepts only schedules of the
    optimizers that ``configure_optimizers`` returns). The other inner optimizers' learning rates
    are left alone.

    Examples:
        >>> import torch
        >>> a, b = nn.Parameter(torch.ones(1)), nn.Parameter(torch.ones(1))
        >>> student, rule = torch.optim.SGD([a], lr=1.0), torch.optim.SGD([b], lr=0.1)
        >>> joint = JointOptimizer([student, rule])
        >>> schedule = JointSchedule(joint, cosine_schedule(student, total_steps=2))
        >>> joint.step(); schedule.step()
        >>> [round(group["lr"], 3) for group in joint.param_groups]
        [0.5, 0.1]
    """

    def __init__(self, optimizer: JointOptimizer, schedule: LRScheduler) -> None:
        if not any(schedule.optimizer is inner for inner in optimizer.optimizers):
            raise ValueError(
                "JointSchedule: the schedule's optimizer is not in the joint optimizer"
            )
        self.optimizer = optimizer  # no LRScheduler.__init__: ``schedule`` already set the rates
        self.schedule = schedule

    def step(self, epoch: int | None = None) -> None:
        self.schedule.step()

    def get_last_lr(self) -> list[float | torch.Tensor]:
        return self.schedule.get_last_lr()

    def state_dict(self) -> dict[str, Any]:
        return self.schedule.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state_dict)


class _InnerStates(Mapping[Any, Any]):
    """The inner optimizers' per-parameter states, read live (a lookup never adds an entry, as
    one in an optimizer's own ``defaultdict`` would)."""

    def __init__(self, optimizers: Sequence[Optimizer]) -> None:
        self.optimizers = optimizers

    def __getitem__(self, parameter: Any) -> Any:
        for optimizer in self.optimizers:
            if parameter in optimizer.state:
                return optimizer.state[parameter]
        raise KeyError(parameter)

    def __iter__(self) -> Iterator[Any]:
        for optimizer in self.optimizers:
            yield from optimizer.state

    def __len__(self) -> int:
        return sum(len(optimizer.state) for optimizer in self.optimizers)
