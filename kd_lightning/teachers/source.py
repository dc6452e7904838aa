"""What a distillation step asks of its teachers: one interface for live, drawn, sharded and
cached teachers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from torch import Tensor, nn

#: A step's stage, as Lightning names its steps; a teacher-output cache reads the split so named.
Stage = Literal["train", "val", "test"]


@dataclass(frozen=True)
class TeacherOutputs:
    """The teachers' answer for one step.

    Attributes:
        logits: float32 ``(K', *batch, C)``, one row per teacher that ran.
        ran: the indices into the source's ``names`` of the rows of ``logits``, in order.
        features: teacher name → output of its tapped layer (see :meth:`TeacherSource.tap`);
            empty unless layers were tapped.

    Examples:
        >>> import torch
        >>> outputs = TeacherOutputs(torch.zeros(1, 2, 3), ran=(2,))
        >>> outputs.logits.shape, outputs.ran, outputs.features
        (torch.Size([1, 2, 3]), (2,), {})
    """

    logits: Tensor
    ran: tuple[int, ...]
    features: Mapping[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_rows(self.logits.shape[0])

    def _check_rows(self, rows: int) -> None:
        """Raise ``ValueError`` unless ``ran`` holds one index for each of the ``rows`` rows."""
        if len(self.ran) != rows:
            raise ValueError(
                f"TeacherOutputs: {len(self.ran)} indices in `ran` for {rows} rows of logits"
            )


@runtime_checkable
class TeacherSource(Protocol):
    """Whatever gives a :class:`~kd_lightning.DistillationModule` its teachers' logits.

    The module calls :meth:`outputs` once per step and never asks which kind of source it holds.
    Implementations: :class:`~kd_lightning.teachers.TeacherEnsemble` (live teachers, every one
    each step), :class:`~kd_lightning.teachers.DrawnTeachers` (a few drawn per training step),
    :class:`~kd_lightning.teachers.sharded.ShardedTeachers` (split over data-parallel ranks),
    :class:`~kd_lightning.teachers.CachedTeachers` (logits read by sample index) and
    :class:`~kd_lightning.teachers.SequenceCachedTeachers` (K language models' sparse top-k
    outputs, read by block and position). A source that
    cannot do what :meth:`tap`, :meth:`networks` or :meth:`shard` ask raises ``ValueError``
    saying why, when the module is configured rather than mid-training.

    Examples:
        >>> import torch
        >>> from kd_lightning.teachers import TeacherEnsemble
        >>> source = TeacherEnsemble({"a": nn.Linear(4, 3), "b": nn.Linear(4, 3)})
        >>> isinstance(source, TeacherSource)
        True
        >>> outputs = source.outputs(torch.randn(5, 4), batch=None, stage="val")
        >>> outputs.logits.shape, outputs.ran
        (torch.Size([2, 5, 3]), (0, 1))
    """

    @property
    def names(self) -> list[str]:
        """Every teacher's name; :attr:`TeacherOutputs.ran` indexes this list."""
        ...

    def outputs(self, inputs: Any, batch: Any, stage: Stage) -> TeacherOutputs:
        """The logits (and tapped features) of the teachers that run on this step.

        Args:
            inputs: the batch's inputs, as the student gets them.
            batch: the whole batch (a cache reads the samples' indices from it).
            stage: ``"train"``, ``"val"`` or ``"test"``.
        """
        ...

    def tap(self, layers: Mapping[str, str]) -> None:
        """From now on, return the output of layer ``layers[name]`` of each teacher ``name`` in
        :attr:`TeacherOutputs.features` (``{}`` stops tapping).

        Raises:
            ValueError: for a source that cannot read every teacher's layers at every step, or
                an unknown teacher or layer.
        """
        ...

    def networks(self) -> Mapping[str, nn.Module]:
        """Teacher name → its network (e.g. to reach a teacher's classifier head).

        Raises:
            ValueError: for a source that holds no networks.
        """
        ...

    def shard(self, rank: int, world_size: int) -> TeacherSource:
        """The source that rank ``rank`` of ``world_size`` data-parallel ranks runs instead;
        ``self`` when nothing changes (e.g. one rank).

        Raises:
            ValueError: for a source that cannot be sharded.
        """
        ...
