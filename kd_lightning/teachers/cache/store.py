"""Read a teacher-output cache: teacher logits by sample index, from memory-mapped ``.npy`` files.

:func:`~kd_lightning.teachers.cache.build.build_output_cache` writes the caches this reads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from kd_lightning.teachers.cache.indices import sample_indices
from kd_lightning.teachers.cache.topk import TopKLogits, TopKTeacherOutputs, expand_topk
from kd_lightning.teachers.source import Stage, TeacherOutputs, TeacherSource

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARTIAL_PREFIX = ".partial-"


class CorruptCacheError(RuntimeError):
    """A cache directory's manifest does not match its files or its name."""


class StoredOutputs:
    """What every cache of teacher outputs shares: the teachers and stages its ``manifest``
    lists, and the teacher-source methods it refuses, since it holds the teachers' logits, not
    the networks, and runs no teacher. ``kind`` names the cache in the errors."""

    kind: ClassVar[str] = "a teacher-output cache"
    manifest: dict[str, Any]

    @property
    def names(self) -> list[str]:
        """Teacher names, in the order of the stacked outputs."""
        return [teacher["name"] for teacher in self.manifest["teachers"]]

    @property
    def stages(self) -> list[str]:
        """The stages whose splits are cached (e.g. ``["test", "train", "val"]``)."""
        return sorted(self.manifest["splits"])

    def __len__(self) -> int:
        return len(self.manifest["teachers"])

    def tap(self, layers: Mapping[str, str]) -> None:
        """Refused (unless nothing is asked): the cache holds logits only."""
        if layers:
            raise ValueError(
                f"{self.kind} holds the teachers' logits only, no layer outputs: tapped layers "
                "(e.g. feature hints) need live teachers"
            )

    def networks(self) -> Mapping[str, nn.Module]:
        """Refused: the cache holds logits only."""
        raise ValueError(f"{self.kind} holds the teachers' logits only, no networks")

    def shard(self, rank: int, world_size: int) -> TeacherSource:
        """Refused: no teacher runs, so there is nothing to shard."""
        raise ValueError(
            f"{self.kind} runs no teachers, so there is none to shard across ranks: sharding "
            "needs live teachers"
        )


class CachedTeachers(StoredOutputs):
    """Teacher logits read from a cache by sample index: the offline stand-in for an ensemble.

    ``logits(stage, indices)`` returns what ``TeacherEnsemble(inputs)`` returned for those samples
    of the split named ``stage`` (``"train"``, ``"val"``, ``"test"``) when the cache was built:
    float32 ``(K, B, *S)`` (with ``top_k``, the logits rebuilt by
    :func:`~kd_lightning.teachers.cache.topk.expand_topk`). The arrays are memory-mapped lazily, after
    pickling too (DDP spawn, dataloader workers), so opening a cache costs only its manifest.

    As a :class:`~kd_lightning.teachers.source.TeacherSource`, :meth:`outputs` reads the batch's
    own sample indices (:func:`~kd_lightning.teachers.cache.indices.sample_indices`); no teacher
    runs, so nothing can be tapped or sharded.

    Args:
        path: a cache directory written by :func:`build_output_cache`.
        expected_fingerprint: refuse the cache unless its manifest carries this fingerprint.

    Examples:
        >>> import tempfile
        >>> from torch import nn
        >>> from torch.utils.data import TensorDataset
        >>> from kd_lightning.teachers import TeacherEnsemble, build_output_cache
        >>> ensemble = TeacherEnsemble({"a": nn.Linear(2, 3)})
        >>> with tempfile.TemporaryDirectory() as root:
        ...     data = {"train": TensorDataset(torch.zeros(4, 2), torch.zeros(4))}
        ...     built = build_output_cache(ensemble, data, root)
        ...     cache = CachedTeachers(built.path)
        ...     cache.names, cache.logits("train", [0, 3]).shape
        (['a'], torch.Size([1, 2, 3]))
        >>> batch = (torch.zeros(2, 2), torch.zeros(2), torch.tensor([1, 2]))  # with its indices
        >>> cache.outputs(batch[0], batch, stage="train").ran
        (0,)
    """

    def __init__(self, path: str | os.PathLike[str], expected_fingerprint: str | None = None):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if self.path.name.startswith(PARTIAL_PREFIX):
            raise CorruptCacheError(f"{self.path} is a partial build, never read")
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except FileNotFoundError:
            raise CorruptCacheError(
                f"{self.path} has no {MANIFEST}: not a complete cache"
            ) from None
        key = self.manifest.get("fingerprint")
        if key != self.path.name or (expected_fingerprint not in (None, key)):
            raise CorruptCacheError(
                f"{manifest_path} holds fingerprint {key!r}, expected "
                f"{expected_fingerprint or self.path.name!r}: delete {self.path} to rebuild"
            )
        if self.manifest.get("format") != FORMAT_VERSION:
            raise CorruptCacheError(
                f"{self.path}: unknown cache format {self.manifest.get('format')}"
            )
        self.top_k: int | None = self.manifest["top_k"]
        self._arrays: dict[str, list[dict[str, np.ndarray]]] | None = None
        self._arrays = self._open()

    @property
    def nbytes(self) -> int:
        """Bytes on disk of the cached arrays."""
        return sum(
            (self.path / name).stat().st_size
            for teachers in self.manifest["files"].values()
            for files in teachers
            for name in files.values()
        )

    def _open(self) -> dict[str, list[dict[str, np.ndarray]]]:
        arrays: dict[str, list[dict[str, np.ndarray]]] = {}
        for split, teachers in self.manifest["files"].items():
            size = self.manifest["splits"][split]["num_samples"]
            arrays[split] = []
            for files in teachers:
                opened = {}
                for part, name in files.items():
                    try:
                        array = np.load(self.path / name, mmap_mode="r", allow_pickle=False)
                    except (OSError, ValueError) as error:
                        raise CorruptCacheError(f"{self.path / name}: {error}") from error
                    if len(array) != size:
                        raise CorruptCacheError(
                            f"{self.path / name} has {len(array)} rows, the manifest {size}"
                        )
                    opened[part] = array
                arrays[split].append(opened)
        return arrays

    def logits(self, stage: str, indices: Tensor | np.ndarray | Sequence[int]) -> Tensor:
        """Float32 logits ``(K, B, *S)`` of the samples ``indices`` of the ``stage`` split."""
        if self.top_k is not None:
            return expand_topk(self.topk(stage, indices))
        rows = self._rows(stage, indices)
        assert self._arrays is not None  # opened by _rows
        return torch.stack(
            [torch.from_numpy(files["logits"][rows]) for files in self._arrays[stage]]
        )

    def topk(self, stage: str, indices: Tensor | np.ndarray | Sequence[int]) -> TopKLogits:
        """The stored top-k outputs (values ``(K, B, *S[:-1], k)``) of the samples ``indices``
        of the ``stage`` split, of a cache built with ``top_k``."""
        if self.top_k is None:
            raise ValueError(f"{self.path} holds every logit (built without top_k), not top-k ones")
        rows = self._rows(stage, indices)
        assert self._arrays is not None  # opened by _rows
        files = self._arrays[stage]
        return TopKLogits(
            values=torch.stack([torch.from_numpy(f["values"][rows]) for f in files]),
            indices=torch.stack([torch.from_numpy(f["indices"][rows]) for f in files]),
            tail_logsumexp=torch.stack([torch.from_numpy(f["tail"][rows]) for f in files]),
            num_classes=self.manifest["splits"][stage]["sample_shape"][-1],
        )

    def _rows(self, stage: str, indices: Tensor | np.ndarray | Sequence[int]) -> np.ndarray:
        """``indices`` as int64 rows of the ``stage`` split, checked against its size."""
        if self._arrays is None:
            self._arrays = self._open()
        if stage not in self._arrays:
            raise KeyError(f"stage {stage!r} is not cached in {self.path}; cached: {self.stages}")
        rows = np.asarray(
            indices.cpu().numpy() if isinstance(indices, Tensor) else indices, dtype=np.int64
        )
        size = self.manifest["splits"][stage]["num_samples"]
        if rows.size and (rows.min() < 0 or rows.max() >= size):
            raise IndexError(
                f"sample indices {rows.min()}..{rows.max()} outside the {stage!r} split of "
                f"{size} samples"
            )
        return rows

    def outputs(self, inputs: Any, batch: Any, stage: Stage) -> TeacherOutputs:
        """Every teacher's cached logits for the batch's samples (read from ``batch`` by
        :func:`~kd_lightning.teachers.cache.indices.sample_indices`), on the indices' device;
        ``inputs`` are not used. A cache built with ``top_k`` gives
        :class:`~kd_lightning.teachers.cache.topk.TopKTeacherOutputs`, expanded only when their
        ``logits`` are read (a loss that
        :attr:`~kd_lightning.DistillationLoss.accepts_topk` reads the top k)."""
        indices = sample_indices(batch)
        ran = tuple(range(len(self)))
        if self.top_k is None:
            return TeacherOutputs(self.logits(stage, indices).to(indices.device), ran)
        return TopKTeacherOutputs(self.topk(stage, indices).to(indices.device), ran)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None}

    def __repr__(self) -> str:
        return f"CachedTeachers({str(self.path)!r}, teachers={self.names}, top_k={self.top_k})"
