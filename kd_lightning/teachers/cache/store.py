"""Read a teacher-output cache: teacher logits by sample index, from memory-mapped ``.npy`` files.

:func:`~kd_lightning.teachers.cache.build.build_output_cache` writes the caches this reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kd_lightning.teachers.cache.topk import TopKLogits, expand_topk

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARTIAL_PREFIX = ".partial-"


class CorruptCacheError(RuntimeError):
    """A cache directory's manifest does not match its files or its name."""


class CachedTeachers:
    """Teacher logits read from a cache by sample index: the offline stand-in for an ensemble.

    ``logits(split, indices)`` returns what ``TeacherEnsemble(inputs)`` returned for those samples
    when the cache was built: float32 ``(K, B, *S)`` (with ``top_k``, the logits rebuilt by
    :func:`~kd_lightning.teachers.cache.topk.expand_topk`). The arrays are memory-mapped lazily, after
    pickling too (DDP spawn, dataloader workers), so opening a cache costs only its manifest.

    Args:
        path: a cache directory written by :func:`build_output_cache`.
        expected_fingerprint: refuse the cache unless its manifest carries this fingerprint.

    Example:
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
    """

    def __init__(self, path: str | os.PathLike[str], expected_fingerprint: str | None = None):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if self.path.name.startswith(PARTIAL_PREFIX):
            raise CorruptCacheError(f"{self.path} is a partial build, never read")
        try:
            self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
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
    def names(self) -> list[str]:
        """Teacher names, in the order of the stacked outputs."""
        return [teacher["name"] for teacher in self.manifest["teachers"]]

    @property
    def splits(self) -> list[str]:
        """The cached splits (e.g. ``["test", "train", "val"]``)."""
        return sorted(self.manifest["splits"])

    def __len__(self) -> int:
        return len(self.manifest["teachers"])

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

    def logits(self, split: str, indices: Tensor | np.ndarray | list[int]) -> Tensor:
        """Float32 logits ``(K, B, *S)`` of the samples ``indices`` of ``split``."""
        if self._arrays is None:
            self._arrays = self._open()
        if split not in self._arrays:
            raise KeyError(f"split {split!r} is not cached in {self.path}; cached: {self.splits}")
        rows = np.asarray(
            indices.cpu().numpy() if isinstance(indices, Tensor) else indices, dtype=np.int64
        )
        size = self.manifest["splits"][split]["num_samples"]
        if rows.size and (rows.min() < 0 or rows.max() >= size):
            raise IndexError(
                f"sample indices {rows.min()}..{rows.max()} outside split {split!r} of {size} samples"
            )
        per_teacher = []
        for files in self._arrays[split]:
            if self.top_k is None:
                per_teacher.append(torch.from_numpy(files["logits"][rows]))
                continue
            packed = TopKLogits(
                values=torch.from_numpy(files["values"][rows]),
                indices=torch.from_numpy(files["indices"][rows]),
                tail_logsumexp=torch.from_numpy(files["tail"][rows]),
                num_classes=self.manifest["splits"][split]["sample_shape"][-1],
            )
            per_teacher.append(expand_topk(packed))
        return torch.stack(per_teacher)

    def __call__(self, indices: Tensor, split: str = "train") -> Tensor:
        return self.logits(split, indices)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None}

    def __repr__(self) -> str:
        return f"CachedTeachers({str(self.path)!r}, teachers={self.names}, top_k={self.top_k})"
