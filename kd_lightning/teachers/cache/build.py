"""The teacher-output cache: run each teacher once over a dataset, then read logits by sample index.

Layout of one cache, ``<root>/<fingerprint>/``::

    manifest.json                  written last: fingerprints, names, shapes, files
    <split>.teacher<k>.logits.npy  (N, *S) float32, when top_k is None
    <split>.teacher<k>.values.npy  (N, *S[:-1], k) float32    } when top_k is set
    <split>.teacher<k>.indices.npy (N, *S[:-1], k) int16/int32 }
    <split>.teacher<k>.tail.npy    (N, *S[:-1]) float32        }

Files are NumPy ``.npy`` arrays read with ``mmap_mode="r"``: the OS pages in only the rows a batch
touches, a gather of random rows is one fancy index, no pickle is involved (``allow_pickle`` stays
off), and any tool reads them. Teachers are named in the manifest, never in a path, so no teacher
name can make the cache write outside its directory.

The directory name is a fingerprint of every teacher (weights, transform, adapter, class map), of
every split's samples, of ``top_k`` and of the batch size the teachers run at (kernels depend on
it, so a row's last bits do too): a changed teacher, dataset or batch size has another directory,
so a stale cache is never found. A cache is written into a hidden ``.partial-*`` directory, its
manifest last, then renamed into place in one ``os.rename``; a build killed midway leaves only the
partial directory, which no reader opens.

Under ``torchrun`` each rank builds only its share of the rows and one rank merges the parts:
see :mod:`kd_lightning.teachers.cache.parts`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from kd_lightning.batch import BatchAdapter
from kd_lightning.teachers.cache.fingerprint import (
    dataset_fingerprint,
    fingerprint,
    teacher_fingerprint,
)
from kd_lightning.teachers.cache.parts import (
    PARTS_PREFIX,
    CacheWriteError,
    build_in_parts,
    check_rank,
    open_array,
    owner_is_dead,
    partial_directory,
    row_range,
    sync_directory,
    writing,
)
from kd_lightning.teachers.cache.store import (
    FORMAT_VERSION,
    MANIFEST,
    PARTIAL_PREFIX,
    CachedTeachers,
    CorruptCacheError,
)
from kd_lightning.teachers.cache.topk import compress_topk, index_dtype
from kd_lightning.teachers.ensemble import TeacherEnsemble

#: Samples per teacher forward while building, unless told otherwise.
BUILD_BATCH_SIZE = 256


class StaleCacheError(FileNotFoundError):
    """No cache matches the teachers and data, and building one was not allowed."""


def cache_fingerprint(
    ensemble: TeacherEnsemble,
    datasets: Mapping[str, Dataset],
    top_k: int | None = None,
    batch_size: int = BUILD_BATCH_SIZE,
) -> tuple[str, dict[str, Any]]:
    """The cache key of ``ensemble`` over ``datasets`` and the description it hashes.

    The batch size enters the key: a teacher's logits for a sample may differ in their last bits
    with the batch around it (kernels are chosen by shape), so a cache built at another batch size
    is another cache.

    Examples:
        >>> from torch import nn
        >>> from torch.utils.data import TensorDataset
        >>> ensemble = TeacherEnsemble({"a": nn.Linear(2, 3)})
        >>> data = {"train": TensorDataset(torch.zeros(4, 2), torch.zeros(4))}
        >>> key, description = cache_fingerprint(ensemble, data)
        >>> len(key), [t["name"] for t in description["teachers"]], description["batch_size"]
        (20, ['a'], 256)
        >>> cache_fingerprint(ensemble, data, batch_size=64)[0] == key
        False
    """
    if top_k is not None and (isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    for split in datasets:
        if not split.isidentifier():
            raise ValueError(f"split names must be identifiers (e.g. 'train'), got {split!r}")
    description = {
        "format": FORMAT_VERSION,
        "teachers": [
            {"name": name, "fingerprint": teacher_fingerprint(ensemble, name)}
            for name in ensemble.names
        ],
        "data": {split: dataset_fingerprint(data) for split, data in sorted(datasets.items())},
        "top_k": top_k,
        "batch_size": batch_size,
    }
    return fingerprint(description), description


def _files(split: str, teacher: int, top_k: int | None) -> dict[str, str]:
    parts = ("logits",) if top_k is None else ("values", "indices", "tail")
    return {part: f"{split}.teacher{teacher}.{part}.npy" for part in parts}


def _write_split(
    directory: Path,
    split: str,
    ensemble: TeacherEnsemble,
    loader: DataLoader,
    batch_adapter: Callable[[Any], tuple[Any, Any]],
    top_k: int | None,
    device: torch.device,
) -> dict[str, Any]:
    """Run the ensemble over ``loader`` (in order) into memory-mapped files; return the shapes."""
    size = len(loader.dataset)  # type: ignore[arg-type]
    arrays: list[dict[str, np.ndarray]] = []
    start = 0
    sample_shape: tuple[int, ...] = ()
    for batch in loader:
        inputs, _ = batch_adapter(batch)
        if isinstance(inputs, Tensor):
            inputs = inputs.to(device)
        logits = ensemble(inputs).cpu()  # (K, B, *S)
        stop = start + logits.shape[1]
        if not arrays:
            sample_shape = tuple(logits.shape[2:])
            arrays = [
                _open_arrays(directory, split, k, size, sample_shape, top_k)
                for k in range(len(ensemble))
            ]
        for k, files in enumerate(arrays):
            if top_k is None:
                files["logits"][start:stop] = logits[k].numpy()
            else:
                packed = compress_topk(logits[k], top_k)
                files["values"][start:stop] = packed.values.numpy()
                files["indices"][start:stop] = packed.indices.numpy()
                files["tail"][start:stop] = packed.tail_logsumexp.numpy()
        start = stop
    if start != size:
        raise RuntimeError(f"split {split!r}: the loader gave {start} samples, the dataset {size}")
    for files in arrays:
        for array in files.values():
            array.flush()  # type: ignore[attr-defined]
    return {"num_samples": size, "sample_shape": list(sample_shape)}


def _open_arrays(
    directory: Path,
    split: str,
    teacher: int,
    size: int,
    sample_shape: tuple[int, ...],
    top_k: int | None,
) -> dict[str, np.ndarray]:
    if not sample_shape:
        raise ValueError("teacher outputs must have a class dimension, got one scalar per sample")
    names = _files(split, teacher, top_k)
    shapes: dict[str, tuple[tuple[int, ...], Any]]
    if top_k is None:
        shapes = {"logits": (sample_shape, np.float32)}
    else:
        if top_k > sample_shape[-1]:
            raise ValueError(f"top_k={top_k} exceeds the {sample_shape[-1]} classes")
        rows = sample_shape[:-1]
        indices = np.dtype(str(index_dtype(sample_shape[-1])).removeprefix("torch."))
        shapes = {
            "values": ((*rows, top_k), np.float32),
            "indices": ((*rows, top_k), indices),
            "tail": (rows, np.float32),
        }
    return {
        part: open_array(directory / names[part], dtype, (size, *shape))
        for part, (shape, dtype) in shapes.items()
    }


def build_output_cache(
    ensemble: TeacherEnsemble,
    datasets: Mapping[str, Dataset],
    root: str | os.PathLike[str],
    top_k: int | None = None,
    batch_size: int = BUILD_BATCH_SIZE,
    batch_adapter: Callable[[Any], tuple[Any, Any]] | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    device: torch.device | str | None = None,
    missing: Literal["build", "error"] = "build",
    rank: int = 0,
    world_size: int = 1,
    wait_s: float = 3600.0,
) -> CachedTeachers:
    """Open the cache of ``ensemble`` over ``datasets`` under ``root``, building it if missing.

    Each dataset (a split: ``{"train": ..., "val": ...}``) is read in index order, without
    shuffling, ``batch_size`` samples at a time; each teacher runs once per batch, under
    ``no_grad`` and in eval mode (the ensemble's own guarantees). Builds are atomic (see the
    module's docstring), so concurrent builders are safe: the first rename wins and the others
    discard their copy. With ``world_size > 1`` the ranks share the work instead: each runs the
    teachers over its contiguous share of each split's batches only
    (:func:`~kd_lightning.teachers.cache.parts.row_range`), into a part that outlives a killed
    build, and one rank merges the parts into the cache a single process would have written
    (:mod:`~kd_lightning.teachers.cache.parts`).

    Args:
        ensemble: the teachers; their outputs are cached exactly as the ensemble returns them.
        datasets: split name → map-style dataset whose samples are deterministic.
        root: the directory holding caches; this one goes to ``root/<fingerprint>``.
        top_k: store only the ``k`` largest logits per row (see :func:`expand_topk`); ``None``
            stores every logit.
        batch_size: samples per teacher forward while building; part of the fingerprint, so
            a cache built at another batch size is rebuilt (or, with ``missing="error"``,
            refused naming the change).
        batch_adapter: batch → ``(inputs, targets)``; :class:`~kd_lightning.BatchAdapter` by default.
        collate_fn: how samples become a batch (the training loader's); PyTorch's default if ``None``.
        device: where the teachers run while building; the ensemble's device by default.
        missing: ``"error"`` raises :class:`StaleCacheError` instead of building, naming what
            changed when an older cache of the same teachers is found.
        rank: this process's rank among the ``world_size`` processes building the cache.
        world_size: how many processes (e.g. ``torchrun`` ranks) share the build; each must
            call this with the same teachers, data and ``top_k``.
        wait_s: with ``world_size > 1``, seconds to wait for the other ranks' parts once this
            rank's part is done, before raising
            :class:`~kd_lightning.teachers.cache.parts.MissingPartsError` naming the missing parts.

    Examples:
        >>> import tempfile
        >>> from torch import nn
        >>> from torch.utils.data import TensorDataset
        >>> ensemble = TeacherEnsemble({"a": nn.Linear(2, 3), "b": nn.Linear(2, 3)})
        >>> x = torch.randn(10, 2)
        >>> with tempfile.TemporaryDirectory() as root:
        ...     cache = build_output_cache(ensemble, {"train": TensorDataset(x, x[:, 0])}, root)
        ...     torch.allclose(cache.logits("train", torch.tensor([3, 1])), ensemble(x[[3, 1]]))
        True
    """
    check_rank(rank, world_size)
    if isinstance(wait_s, bool) or not isinstance(wait_s, int | float) or not wait_s >= 0:
        raise ValueError(f"wait_s must be a non-negative number of seconds, got {wait_s!r}")
    key, description = cache_fingerprint(ensemble, datasets, top_k, batch_size)
    root = Path(root)
    final = root / key
    if (final / MANIFEST).is_file():
        return CachedTeachers(final, expected_fingerprint=key)
    if missing == "error":
        raise StaleCacheError(_missing_message(root, key, description))
    if missing != "build":
        raise ValueError(f"missing must be 'build' or 'error', got {missing!r}")
    if final.exists():
        raise CorruptCacheError(f"{final} exists without a {MANIFEST}: delete it to rebuild")
    sizes = {split: len(data) for split, data in sorted(datasets.items())}  # type: ignore[arg-type]
    empty = [split for split, size in sizes.items() if size == 0]
    if empty:
        raise ValueError(f"split {empty[0]!r} has no samples: there is nothing to cache")
    root.mkdir(parents=True, exist_ok=True)
    target = torch.device(device) if device is not None else _device_of(ensemble)
    adapter = batch_adapter if batch_adapter is not None else BatchAdapter()

    def write_rows(directory: Path, split: str, rows: range) -> dict[str, Any]:
        dataset = datasets[split]
        if len(rows) != sizes[split]:
            dataset = Subset(dataset, rows)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
        return _write_split(directory, split, ensemble, loader, adapter, top_k, target)

    files = {split: [_files(split, k, top_k) for k in range(len(ensemble))] for split in sizes}
    ensemble.to(target)
    if world_size > 1:
        shares = {
            split: [row_range(size, r, world_size, batch_size) for r in range(world_size)]
            for split, size in sizes.items()
        }
        build_in_parts(final, description, files, shares, write_rows, rank, wait_s)
        return CachedTeachers(final, expected_fingerprint=key)
    partial = partial_directory(root, key)
    try:
        splits = {split: write_rows(partial, split, range(size)) for split, size in sizes.items()}
        manifest = {**description, "fingerprint": key, "splits": splits, "files": files}
        with writing(partial / MANIFEST):
            (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        sync_directory(partial)
        try:
            os.rename(partial, final)
        except OSError:
            if not (final / MANIFEST).is_file():
                raise  # not a concurrent builder's complete cache: a real failure
    except CacheWriteError as error:
        error.args = (f"{error}; the partial build was removed, so no cache was kept",)
        raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return CachedTeachers(final, expected_fingerprint=key)


def _device_of(ensemble: TeacherEnsemble) -> torch.device:
    # Where the teachers run: with offload=True, where the ensemble was moved, not its weights.
    return ensemble.device


def _missing_message(root: Path, key: str, description: dict[str, Any]) -> str:
    """Why no cache is usable, naming the teachers or splits that changed since an older one."""
    lines = [f"no teacher-output cache {root / key} for these teachers and data"]
    names = [teacher["name"] for teacher in description["teachers"]]
    for manifest_path in sorted(root.glob(f"*/{MANIFEST}")):
        try:
            old = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            continue
        if [teacher["name"] for teacher in old.get("teachers", [])] != names:
            continue
        changed = [
            f"teacher '{new['name']}'"
            for new, before in zip(description["teachers"], old["teachers"], strict=True)
            if new["fingerprint"] != before.get("fingerprint")
        ]
        changed += [
            f"data split '{split}'"
            for split, digest in description["data"].items()
            if old.get("data", {}).get(split) != digest
        ]
        for option in ("top_k", "batch_size"):
            if old.get(option) != description[option]:
                changed.append(f"{option} ({old.get(option)} → {description[option]})")
        lines.append(f"  {manifest_path.parent.name} is stale: changed {', '.join(changed)}")
    lines.append("build it (allow building, or run `kd-cache`) before training from the cache")
    return "\n".join(lines)


def remove_partial_builds(root: str | os.PathLike[str]) -> list[Path]:
    """Delete partial builds under ``root`` left by dead processes of this host; return them.

    Partial caches and partial rank parts go; completed rank parts stay, for a relaunch to reuse.
    """
    root = Path(root)
    removed = []
    candidates = [
        *root.glob(f"{PARTIAL_PREFIX}*"),
        *root.glob(f"{PARTS_PREFIX}*/{PARTIAL_PREFIX}*"),
    ]
    for path in sorted(candidates):
        if owner_is_dead(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
