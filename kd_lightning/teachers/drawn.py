"""A few teachers drawn at random per training step, the only ones that run in it."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from kd_lightning.teachers.ensemble import TeacherEnsemble
from kd_lightning.teachers.source import Stage, TeacherOutputs, TeacherSource


class DrawnTeachers(nn.Module):
    """Run ``per_step`` teachers drawn uniformly at random (without replacement) per training step.

    Fukuda et al. (Interspeech 2017) distil from one teacher drawn per batch: in expectation the
    same target as the mean of the teachers' probabilities, at ``1 / K`` of the teacher cost. Each
    training step draws once from torch's global generator (one ``torch.randperm``), so seeded runs
    draw the same teachers and a resumed run whose random state is restored (e.g. by
    :class:`~kd_lightning.callbacks.RandomStateCheckpoint`) draws what the first run would have.
    Only the drawn teachers run; their rows come back in index order and any fusion rule fuses
    them alone (with ``per_step=1`` the mean of probabilities is that teacher's). Validation and
    test steps run, and so measure, every teacher.

    A :class:`~kd_lightning.teachers.source.TeacherSource`: it can be neither tapped (feature hints
    need every teacher's layers at every step) nor sharded (sharding exchanges every teacher's
    logits at every step).

    Args:
        ensemble: the teachers to draw from.
        per_step: how many teachers run in each training step, from 1 to ``len(ensemble)``.

    Examples:
        >>> ensemble = TeacherEnsemble({"a": nn.Linear(4, 3), "b": nn.Linear(4, 3), "c": nn.Linear(4, 3)})
        >>> drawn = DrawnTeachers(ensemble, per_step=1)
        >>> x = torch.randn(5, 4)
        >>> _ = torch.manual_seed(0)
        >>> train = drawn.outputs(x, batch=None, stage="train")
        >>> train.logits.shape, len(train.ran), drawn.outputs(x, batch=None, stage="val").ran
        (torch.Size([1, 5, 3]), 1, (0, 1, 2))
        >>> torch.equal(train.logits[0], ensemble(x)[train.ran[0]])
        True
    """

    ensemble: TeacherEnsemble
    per_step: int

    def __init__(self, ensemble: TeacherEnsemble, per_step: int = 1) -> None:
        super().__init__()
        if (
            isinstance(per_step, bool)
            or not isinstance(per_step, numbers.Integral)
            or not 1 <= per_step <= len(ensemble)
        ):
            raise ValueError(
                f"per_step must be an integer from 1 to the number of teachers ({len(ensemble)}), "
                f"got {per_step!r}"
            )
        self.ensemble = ensemble
        self.per_step = int(per_step)

    @property
    def names(self) -> list[str]:
        """Every teacher's name, drawn or not."""
        return self.ensemble.names

    def outputs(self, inputs: Any, batch: Any, stage: Stage) -> TeacherOutputs:
        """The drawn teachers' logits in a training step, every teacher's otherwise."""
        if stage != "train":
            return self.ensemble.outputs(inputs, batch, stage)
        drawn = tuple(sorted(torch.randperm(len(self.ensemble))[: self.per_step].tolist()))
        return TeacherOutputs(self.ensemble(inputs, only=drawn), drawn)

    def tap(self, layers: Mapping[str, str]) -> None:
        """Refused: a training step runs only the drawn teachers."""
        if layers:
            raise ValueError(
                f"DrawnTeachers runs only {self.per_step} drawn teacher(s) per training step: "
                "tapped layers (e.g. feature hints) need every teacher at every step"
            )

    def networks(self) -> Mapping[str, nn.Module]:
        """Teacher name → teacher network."""
        return self.ensemble.networks()

    def shard(self, rank: int, world_size: int) -> TeacherSource:
        """Refused: sharded teachers exchange every teacher's logits at every step."""
        raise ValueError(
            f"DrawnTeachers runs a subset of the teachers ({self.per_step} drawn per training "
            "step), but sharded teachers exchange every teacher's logits at every step: draw "
            "teachers or shard them, not both"
        )

    def extra_repr(self) -> str:
        return f"per_step={self.per_step}"
