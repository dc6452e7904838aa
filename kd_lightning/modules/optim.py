"""Optimizer and learning-rate schedule plumbing shared by every module."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

OptimizerFactory = Callable[[Iterable[nn.Parameter]], Optimizer]
SchedulerFactory = Callable[..., LRScheduler]


def cosine_schedule(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0) -> LambdaLR:
    """Linear warm-up, then cosine decay to zero over ``total_steps`` optimizer steps.

    Modules pass ``total_steps`` themselves (the trainer's estimated stepping batches), so a config
    only names the function: ``{_target_: kd_lightning.modules.optim.cosine_schedule, _partial_: true}``.

    Example:
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
