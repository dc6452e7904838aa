"""Rank-sharded builds of a teacher-output cache: each rank writes its part, one rank merges them.

Under ``torchrun`` every rank calls :func:`~kd_lightning.teachers.cache.build.build_output_cache`
with its ``rank`` and ``world_size``; rank ``r`` of ``W`` runs the teachers only over its
contiguous share of whole batches of each split (:func:`row_range`). While the cache is built, ``<root>`` holds::

    .parts-<fingerprint>/part<r>of<W>/        a completed part of rank r
        part.json                             written last: fingerprint, rank, rows per split
        <split>.teacher<k>.<array>.npy        the part's rows only
    .parts-<fingerprint>/.partial-part<r>of<W>-<host>-<pid>-<id>/   a part being written
    .partial-<fingerprint>-<host>-<pid>-<id>/                       the merge being written

A part is written into its hidden partial directory, ``part.json`` last, then renamed into place,
and it is read only through a ``part.json`` naming this fingerprint, world size, rank and rows:
a part of a killed build is either complete or built again. Completed parts outlive a killed
build, and the fingerprint covers teachers, data, ``top_k`` and the batch size, so a relaunch with the same world
size runs only the missing parts. Whichever rank sees all ``W`` parts complete, and no live merge
under way, concatenates them into the usual single-cache layout through the usual partial
directory and atomic rename (concurrent mergers are safe: the first rename wins), then removes the
parts directory. The other ranks poll until the cache's manifest appears.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from kd_lightning.teachers.cache.store import MANIFEST, PARTIAL_PREFIX, CorruptCacheError

PARTS_PREFIX = ".parts-"
PART_MANIFEST = "part.json"
POLL_S = 0.2
COPY_CHUNK_BYTES = 64 * 2**20

WriteRows = Callable[[Path, str, range], dict[str, Any]]
"""``(directory, split, rows) -> {"sample_shape": [...], ...}``: run the teachers over ``rows``."""


#: Errors of a write that found no room: a full disk, a full quota, a file-size limit.
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class MissingPartsError(TimeoutError):
    """The other ranks' parts of a cache did not all appear within ``wait_s``."""


class CacheWriteError(OSError):
    """A cache file could not be written (e.g. the disk is full); the message names the file."""


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Re-raise an ``OSError`` of the block as a :class:`CacheWriteError` naming ``path``.

    Examples:
        >>> with writing(Path("/cache/train.npy")):
        ...     raise OSError(errno.EFBIG, "File too large")
        Traceback (most recent call last):
        ...
        kd_lightning.teachers.cache.parts.CacheWriteError: could not write /cache/train.npy: File too large (the disk is full or a file-size limit was hit)
    """
    try:
        yield
    except CacheWriteError:
        raise
    except OSError as error:
        reason = error.strerror or str(error)
        if error.errno in NO_ROOM:
            reason += " (the disk is full or a file-size limit was hit)"
        written = CacheWriteError(f"could not write {path}: {reason}")
        written.errno = error.errno
        raise written from error


def open_array(path: Path, dtype: Any, shape: tuple[int, ...]) -> np.memmap:
    """A new ``.npy`` file at ``path`` opened as a writable memory map, its blocks allocated
    on disk first: a disk without room fails here, as a :class:`CacheWriteError`, rather than
    with a ``SIGBUS`` when a page of the map is written later."""
    with writing(path):
        array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        if hasattr(os, "posix_fallocate"):
            with open(path, "r+b") as file:
                os.posix_fallocate(file.fileno(), 0, os.fstat(file.fileno()).st_size)
    return array


def check_rank(rank: int, world_size: int) -> None:
    """Raise ``ValueError`` unless ``0 <= rank < world_size``, both integers.

    Examples:
        >>> check_rank(1, 2)
        >>> check_rank(2, 2)
        Traceback (most recent call last):
        ...
        ValueError: rank must lie in [0, world_size=2), got rank=2
    """
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got world_size={world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size={world_size}), got rank={rank}")


def row_range(size: int, rank: int, world_size: int, batch_size: int = 1) -> range:
    """The rows of a split of ``size`` samples that ``rank`` builds: contiguous, in index order.

    The ranks share whole batches: of the ``B = ceil(size / batch_size)`` batches, rank ``r``
    gets ``[r*B//W, (r+1)*B//W)``. Each batch is then the one a single process would run, so
    the cache holds the same bytes whatever the world size (a teacher's output for a row can
    differ in its last bits with the other rows of its batch, as matrix kernels change with the
    batch's shape). With ``batch_size=1`` these are the rows ``[r*N//W, (r+1)*N//W)``.

    Examples:
        >>> [list(row_range(5, rank, 2)) for rank in range(2)]
        [[0, 1], [2, 3, 4]]
        >>> [list(row_range(10, rank, 2, batch_size=4)) for rank in range(2)]
        [[0, 1, 2, 3], [4, 5, 6, 7, 8, 9]]
    """
    batches = -(-size // batch_size)
    start = rank * batches // world_size * batch_size
    stop = (rank + 1) * batches // world_size * batch_size
    return range(min(start, size), min(stop, size))


def part_name(rank: int, world_size: int) -> str:
    """The directory name of rank ``rank``'s part, e.g. ``part0of2``."""
    return f"part{rank}of{world_size}"


def partial_directory(parent: Path, tag: str) -> Path:
    """Make and return ``parent/.partial-<tag>-<host>-<pid>-<id>``, owned by this process."""
    owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path = parent / f"{PARTIAL_PREFIX}{tag}-{owner}"
    path.mkdir()
    return path


def owner_is_dead(path: Path) -> bool:
    """Whether the process that made the partial directory ``path`` is known to be gone.

    Only a process of this host can be checked; any other owner counts as alive.
    """
    owner = path.name.removeprefix(PARTIAL_PREFIX).partition("-")[2].rsplit("-", 2)
    if len(owner) != 3 or owner[0] != socket.gethostname() or not owner[1].isdigit():
        return False
    try:
        os.kill(int(owner[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def sync_directory(directory: Path) -> None:
    """Flush every file of ``directory``, then the directory, to disk (before a rename)."""
    for path in directory.iterdir():
        with writing(path), open(path, "rb") as file:
            os.fsync(file.fileno())
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def build_in_parts(
    final: Path,
    description: Mapping[str, Any],
    files: Mapping[str, list[dict[str, str]]],
    shares: Mapping[str, list[range]],
    write_rows: WriteRows,
    rank: int,
    wait_s: float,
) -> None:
    """Write rank ``rank``'s part of the cache ``final``, then wait for it (or merge it).

    Args:
        final: the cache directory, ``<root>/<fingerprint>``.
        description: what the fingerprint hashes; the manifest starts with it.
        files: split → per teacher, array → file name (the manifest's ``files``).
        shares: split → the rows of each rank (:func:`row_range`), in the manifest's order.
        write_rows: runs the teachers over some rows of a split into a directory.
        rank: this process's rank, among ``len(shares[split])`` ranks.
        wait_s: seconds to wait, once this rank's part is done, for the others'.

    Raises:
        MissingPartsError: the cache is still incomplete after ``wait_s``.
    """
    parts = final.parent / f"{PARTS_PREFIX}{final.name}"
    world_size = len(next(iter(shares.values())))
    if _read_part(parts, final.name, rank, shares) is None:
        _write_part(parts, final.name, rank, shares, write_rows)
    deadline = time.monotonic() + wait_s
    while not (final / MANIFEST).is_file():
        manifests = [_read_part(parts, final.name, r, shares) for r in range(world_size)]
        missing = [part_name(r, world_size) for r, found in enumerate(manifests) if found is None]
        merges = [
            path
            for path in final.parent.glob(f"{PARTIAL_PREFIX}{final.name}-*")
            if not owner_is_dead(path)
        ]
        if not missing and not merges:
            complete = [manifest for manifest in manifests if manifest is not None]
            _merge(final, parts, complete, description, files)
            continue
        if time.monotonic() >= deadline:
            waiting_for = (
                f"parts {', '.join(missing)} are still missing in {parts}"
                if missing
                else f"the merge in {', '.join(str(path) for path in merges)} has not finished"
            )
            raise MissingPartsError(
                f"rank {rank} of {world_size}: after {wait_s:g} s, {waiting_for}; does every one "
                f"of the {world_size} ranks build this cache with the same teachers, data and "
                "top_k? (raise wait_s if the other ranks are only slower)"
            )
        time.sleep(POLL_S)


def _read_part(
    parts: Path, key: str, rank: int, shares: Mapping[str, list[range]]
) -> dict[str, Any] | None:
    """The part manifest of ``rank``, or ``None`` if that part is absent, partial or another's."""
    world_size = len(next(iter(shares.values())))
    try:
        manifest = json.loads((parts / part_name(rank, world_size) / PART_MANIFEST).read_text())
        rows = {
            split: range(entry["start"], entry["stop"])
            for split, entry in manifest["splits"].items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    expected = {split: ranges[rank] for split, ranges in shares.items()}
    found = (manifest.get("fingerprint"), manifest.get("rank"), manifest.get("world_size"))
    if found != (key, rank, world_size) or rows != expected:
        return None
    return manifest


def _write_part(
    parts: Path, key: str, rank: int, shares: Mapping[str, list[range]], write_rows: WriteRows
) -> None:
    world_size = len(next(iter(shares.values())))
    parts.mkdir(parents=True, exist_ok=True)
    name = part_name(rank, world_size)
    partial = partial_directory(parts, name)
    try:
        splits = {}
        for split, ranges in shares.items():
            rows = ranges[rank]
            written = write_rows(partial, split, rows)
            splits[split] = {
                "start": rows.start,
                "stop": rows.stop,
                "sample_shape": written["sample_shape"] if rows else None,
            }
        manifest = {"fingerprint": key, "rank": rank, "world_size": world_size, "splits": splits}
        with writing(partial / PART_MANIFEST):
            (partial / PART_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        sync_directory(partial)
        if _read_part(parts, key, rank, shares) is None:
            shutil.rmtree(parts / name, ignore_errors=True)  # left without part.json: never read
            try:
                os.rename(partial, parts / name)
            except OSError:
                if _read_part(parts, key, rank, shares) is None:
                    raise  # not a concurrent writer's complete part: a real failure
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _merge(
    final: Path,
    parts: Path,
    manifests: list[dict[str, Any]],
    description: Mapping[str, Any],
    files: Mapping[str, list[dict[str, str]]],
) -> None:
    """Concatenate the parts (``manifests``, in rank order) into ``final``; remove ``parts``."""
    partial = partial_directory(final.parent, final.name)
    try:
        splits = {}
        for split, teachers in files.items():
            entries = [manifest["splits"][split] for manifest in manifests]
            sources = [
                (parts / part_name(rank, len(manifests)), range(entry["start"], entry["stop"]))
                for rank, entry in enumerate(entries)
                if entry["stop"] > entry["start"]
            ]
            for teacher_files in teachers:
                for name in teacher_files.values():
                    _concatenate(partial / name, [(path / name, rows) for path, rows in sources])
            sample_shape = next(e["sample_shape"] for e in entries if e["stop"] > e["start"])
            splits[split] = {"num_samples": entries[-1]["stop"], "sample_shape": sample_shape}
        manifest = {**description, "fingerprint": final.name, "splits": splits, "files": files}
        with writing(partial / MANIFEST):
            (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        sync_directory(partial)
        os.rename(partial, final)
    except Exception:
        if not (final / MANIFEST).is_file():
            raise  # no concurrent merger completed the cache: a real failure
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(parts, ignore_errors=True)


def _concatenate(target: Path, sources: list[tuple[Path, range]]) -> None:
    """Write the rows of each ``(file, rows)`` source into ``target``, a new ``.npy`` array."""
    arrays = [np.load(path, mmap_mode="r", allow_pickle=False) for path, _ in sources]
    first = arrays[0]
    size = sources[-1][1].stop
    out = open_array(target, first.dtype, (size, *first.shape[1:]))
    row_bytes = max(1, first.dtype.itemsize * int(np.prod(first.shape[1:])))
    step = max(1, COPY_CHUNK_BYTES // row_bytes)
    for array, (path, rows) in zip(arrays, sources, strict=True):
        if array.dtype != out.dtype or array.shape != (len(rows), *out.shape[1:]):
            raise CorruptCacheError(
                f"{path} holds {array.dtype} {array.shape}, expected "
                f"{out.dtype} {(len(rows), *out.shape[1:])}: delete {path.parent} to rebuild it"
            )
        for start in range(0, len(rows), step):
            stop = min(start + step, len(rows))
            out[rows.start + start : rows.start + stop] = array[start:stop]
    out.flush()
