"""Teachers sharded across data-parallel ranks: each rank holds and runs a subset of them."""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kd_lightning.teachers.ensemble import TeacherEnsemble
from kd_lightning.teachers.source import Stage, TeacherOutputs, TeacherSource


def teacher_shard(num_teachers: int, rank: int, world_size: int) -> list[int]:
    """The indices of the teachers rank ``rank`` holds: every ``world_size``-th, from ``rank``.

    Examples:
        >>> teacher_shard(5, 0, 2), teacher_shard(5, 1, 2)
        ([0, 2, 4], [1, 3])
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if world_size > num_teachers:
        raise ValueError(
            f"cannot shard {num_teachers} teachers over {world_size} ranks: every rank must hold "
            f"at least one teacher; use at most {num_teachers} ranks or run every teacher on every "
            f"rank (teacher_runtime.shard_across_ranks=false)"
        )
    return list(range(rank, num_teachers, world_size))


class ShardedTeachers(nn.Module):
    """Each data-parallel rank holds a subset of the teachers and runs it on the global batch.

    With ``W`` ranks and ``K`` teachers, rank ``r`` keeps teachers ``r, r + W, …``
    (:func:`teacher_shard`), so each rank holds about ``K / W`` teachers' weights and activations
    instead of ``K``. Per step the ranks gather their inputs into the global batch, each runs its
    teachers on all of it (the same teacher FLOPs per rank as an unsharded ensemble on the local
    batch), and one ``all_to_all`` sends every rank its own samples' logits from every teacher. The
    result is what the whole ensemble gives on the local batch: ``(K, B, *S)``.

    Every rank must call :meth:`forward` (or :meth:`outputs`) at the same steps, as data-parallel
    training does. Inputs are one tensor, or a mapping of tensors (a language-model batch's
    ``input_ids`` and ``attention_mask``, as :class:`~kd_lightning.BatchAdapter` gives them), of
    the same shapes on every rank but for the batch size. As a
    :class:`~kd_lightning.teachers.source.TeacherSource` it gives every teacher's logits at every
    step; no rank holds every teacher, so none can tap their layers. Built by
    :meth:`TeacherEnsemble.shard <kd_lightning.teachers.TeacherEnsemble.shard>`.

    Args:
        ensemble: every teacher; only this rank's shard is kept (the same modules, not copies).
        rank: this process's rank in ``group``.
        world_size: the number of ranks in ``group``; at most ``len(ensemble)``.
        group: the process group; the default group when ``None``.

    Examples:
        One rank holds every teacher and behaves as the ensemble:

        >>> import tempfile
        >>> store = f"file://{tempfile.mkdtemp()}/store"
        >>> dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
        >>> ensemble = TeacherEnsemble({"a": nn.Linear(4, 3), "b": nn.Linear(4, 3)})
        >>> x = torch.randn(5, 4)
        >>> sharded = ShardedTeachers(ensemble, rank=0, world_size=1)
        >>> torch.allclose(sharded(x), ensemble(x)), sharded.outputs(x).ran
        (True, (0, 1))
        >>> dist.destroy_process_group()
    """

    def __init__(
        self,
        ensemble: TeacherEnsemble,
        rank: int,
        world_size: int,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.all_names = list(ensemble.names)
        self._all = tuple(range(len(self.all_names)))
        self.rank, self.world_size, self.group = rank, world_size, group
        self.owned = teacher_shard(len(ensemble), rank, world_size)
        self.local = ensemble.select([self.all_names[index] for index in self.owned])
        self._shapes_checked = False

    @property
    def names(self) -> list[str]:
        """Every teacher's name, held here or not, in the order of the returned logits."""
        return list(self.all_names)

    def __len__(self) -> int:
        return len(self.all_names)

    def train(self, mode: bool = True) -> ShardedTeachers:
        """Teachers are locked in eval mode: ``mode`` is ignored."""
        return super().train(False)

    def outputs(self, inputs: Any, batch: Any = None, stage: Stage = "train") -> TeacherOutputs:
        """Every teacher's logits on this rank's ``inputs``, in every stage."""
        return TeacherOutputs(self(inputs), self._all)

    def tap(self, layers: Mapping[str, str]) -> None:
        """Refused: each rank holds only its own teachers."""
        if layers:
            raise ValueError(
                "sharded teachers cannot serve tapped layers (e.g. feature hints): each rank "
                "holds only its own teachers"
            )

    def networks(self) -> Mapping[str, nn.Module]:
        """Refused: each rank holds only its own teachers."""
        raise ValueError(
            f"sharded teachers: rank {self.rank} holds only {self.local.names} of {self.names}"
        )

    def shard(self, rank: int, world_size: int) -> TeacherSource:
        """``self`` for the rank and group size it was sharded for; another is refused."""
        if (rank, world_size) != (self.rank, self.world_size):
            raise ValueError(
                f"these teachers are already sharded for rank {self.rank} of {self.world_size}, "
                f"not rank {rank} of {world_size}: shard the whole ensemble"
            )
        return self

    def forward(self, inputs: Any) -> Tensor:
        """Every teacher's float32 logits on this rank's ``inputs``, ``(K, B, *S)``."""
        if not dist.is_initialized() or dist.get_world_size(self.group) != self.world_size:
            running = dist.get_world_size(self.group) if dist.is_initialized() else 1
            raise RuntimeError(
                f"these teachers were sharded over {self.world_size} ranks, but this process runs "
                f"in a group of {running}: each rank holds only its own teachers"
            )
        parts = _input_parts(inputs)
        sizes = self._gather_sizes(parts)
        gathered = {key: self._gather_inputs(part, sizes) for key, part in parts.items()}
        global_inputs = gathered[""] if isinstance(inputs, Tensor) else gathered
        local_logits = self.local(global_inputs)  # (K_r, N, *S)
        if not self._shapes_checked:
            self._check_shapes(local_logits)
        return self._exchange(local_logits, sizes)

    def _gather_sizes(self, parts: dict[str, Tensor]) -> list[int]:
        """Every rank's batch size, after checking that the ranks' inputs agree on the rest: one
        collective for a tensor, two for a mapping (its keys and ranks first, then its shapes)."""
        first = next(iter(parts.values()))
        mapping = list(parts) != [""]
        if mapping:
            self._check_keys(parts)
        sizes = [
            size
            for part in parts.values()
            for size in ([part.ndim] if mapping else []) + [*part.shape]
        ]
        shape = torch.tensor(sizes, device=first.device)
        shapes = [torch.zeros_like(shape) for _ in range(self.world_size)]
        dist.all_gather(shapes, shape, group=self.group)
        per_rank = [_shapes(s.tolist(), list(parts)) for s in shapes]
        if len({tuple(shape[1:] for shape in rank.values()) for rank in per_rank}) > 1:
            described = [rank[""] if list(rank) == [""] else rank for rank in per_rank]
            raise ValueError(
                f"sharded teachers gather the ranks' inputs into one batch, but their shapes "
                f"differ beyond the batch dimension: {described} (pad sequences to one length on "
                f"every rank)"
            )
        return [next(iter(rank.values()))[0] for rank in per_rank]

    def _check_keys(self, parts: dict[str, Tensor]) -> None:
        """The ranks' input mappings must hold the same keys, with tensors of the same ranks."""
        first = next(iter(parts.values()))
        signature = "\0".join(f"{key}:{part.ndim}" for key, part in parts.items())
        mine = torch.tensor([zlib.crc32(signature.encode())], device=first.device)
        found = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(found, mine, group=self.group)
        if len({int(value) for value in found}) > 1:
            raise ValueError(
                f"sharded teachers gather the ranks' inputs into one batch, but the ranks' input "
                f"mappings differ in their keys or tensor ranks (rank {self.rank} holds "
                f"{ {key: tuple(part.shape) for key, part in parts.items()} })"
            )

    def _gather_inputs(self, inputs: Tensor, sizes: list[int]) -> Tensor:
        largest = max(sizes)
        padded = inputs.new_zeros((largest, *inputs.shape[1:]))
        padded[: inputs.shape[0]] = inputs
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded.contiguous(), group=self.group)
        return torch.cat([part[:size] for part, size in zip(gathered, sizes, strict=True)])

    def _check_shapes(self, local_logits: Tensor) -> None:
        """Once: every rank's teachers must give the same sample shape (e.g. class count)."""
        shape = torch.tensor(local_logits.shape[2:], device=local_logits.device)
        rank_count = torch.tensor([shape.numel()], device=shape.device)
        counts = [torch.zeros_like(rank_count) for _ in range(self.world_size)]
        dist.all_gather(counts, rank_count, group=self.group)
        shapes = [
            torch.zeros(int(count), dtype=shape.dtype, device=shape.device) for count in counts
        ]
        dist.all_gather(shapes, shape, group=self.group)
        described = {
            ", ".join(
                self.all_names[k] for k in teacher_shard(len(self), rank, self.world_size)
            ): tuple(int(v) for v in rank_shape)
            for rank, rank_shape in enumerate(shapes)
        }
        if len(set(described.values())) > 1:
            raise ValueError(f"sharded teachers disagree on output shape: {described}")
        self._shapes_checked = True

    def _exchange(self, local_logits: Tensor, sizes: list[int]) -> Tensor:
        """Send each rank its samples' logits from this rank's teachers; stack all teachers."""
        per_rank = math.ceil(len(self) / self.world_size)
        held, total, *sample_shape = local_logits.shape
        send = local_logits.new_zeros((total, per_rank, *sample_shape))
        send[:, :held] = local_logits.transpose(0, 1)
        mine = sizes[self.rank]
        received = send.new_empty((self.world_size * mine, per_rank, *sample_shape))
        dist.all_to_all_single(
            received,
            send,
            output_split_sizes=[mine] * self.world_size,
            input_split_sizes=sizes,
            group=self.group,
        )
        by_rank = received.view(self.world_size, mine, per_rank, *sample_shape)
        rows = [by_rank[k % self.world_size, :, k // self.world_size] for k in range(len(self))]
        return torch.stack(rows)


def _input_parts(inputs: Any) -> dict[str, Tensor]:
    """The tensors to gather: ``{"": inputs}`` for a tensor, the mapping's for a mapping of
    tensors (e.g. ``input_ids`` and ``attention_mask``), all of one batch size."""
    if isinstance(inputs, Tensor):
        return {"": inputs}
    if (
        not isinstance(inputs, Mapping)
        or not inputs
        or not all(isinstance(value, Tensor) and value.ndim >= 1 for value in inputs.values())
    ):
        raise TypeError(
            f"sharded teachers exchange inputs between ranks: they need a tensor or a mapping "
            f"of tensors, got {type(inputs).__name__}"
        )
    parts = {str(key): value for key, value in inputs.items()}
    if len({part.shape[0] for part in parts.values()}) > 1:
        raise ValueError(
            f"sharded teachers split inputs by sample, but the mapping's tensors differ in batch "
            f"size: { {key: tuple(part.shape) for key, part in parts.items()} }"
        )
    return parts


def _shapes(values: list[int], keys: list[str]) -> dict[str, tuple[int, ...]]:
    """Key → shape, read back from a rank's list of sizes: a tensor's shape, or for a mapping
    each tensor's number of dimensions followed by its shape."""
    if keys == [""]:
        return {"": tuple(values)}
    shapes, at = {}, 0
    for key in keys:
        ndim = values[at]
        shapes[key] = tuple(values[at + 1 : at + 1 + ndim])
        at += 1 + ndim
    return shapes
