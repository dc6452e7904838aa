"""Build a sequence cache: run K causal-LM teachers once over every packed block, store their
top-k outputs (:mod:`~kd_lightning.teachers.cache.sequence_store` has the layout).

While a cache is built, ``<root>`` holds::

    .partial-<fingerprint>/              the build: its completed chunk files, later the manifest
        <split>.<c:05d>.npy              a completed chunk (written to a temporary file, synced,
                                         then moved into place with ``os.replace``)
        .<split>.<c:05d>.npy.<id>.tmp    a chunk being written

The cache's directory name is a fingerprint of the teachers (weights, transforms, adapters), the
tokenizer, the block length, the vocabulary, ``top_k``, ``value_bits``, the chunk size, the batch
size the teachers run at (a row's last bits can change with the batch around it, as kernels are
chosen by shape) and every split's blocks. Its chunk files are written in place in the build directory, the manifest last,
then the directory is renamed to ``<root>/<fingerprint>`` in one ``os.rename``: a build killed
midway leaves only ``.partial-<fingerprint>``, which no reader opens. That directory's name
depends on the fingerprint alone, so the next build of the same cache finds it, keeps every chunk
file whose header, size and checksums are sound, and runs the teachers over the other chunks only.
The chunk files are the cache's own files, so the finished cache needs no merge and no copy
(unlike the rank parts of :mod:`~kd_lightning.teachers.cache.parts`, which are concatenated).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from kd_lightning.batch import MODEL_INPUT_KEYS
from kd_lightning.teachers.cache.build import StaleCacheError
from kd_lightning.teachers.cache.fingerprint import dataset_fingerprint, teacher_fingerprint
from kd_lightning.teachers.cache.parts import CacheWriteError, sync_directory, writing
from kd_lightning.teachers.cache.sequence_store import (
    FORMAT,
    FORMAT_VERSION,
    SequenceCachedTeachers,
    block_dtype,
    cache_key,
    check_layout,
    checksum,
    chunk_name,
    encode_rows,
    input_checksums,
    read_header,
)
from kd_lightning.teachers.cache.store import MANIFEST, PARTIAL_PREFIX, CorruptCacheError
from kd_lightning.teachers.ensemble import TeacherEnsemble

STAGES = ("train", "val", "test")
Split = tuple[Dataset, Callable[[list[Any]], Any] | None]
"""A split to cache: its dataset, and how its samples become a batch (``None``: PyTorch's)."""


def build_sequence_cache(
    teachers: TeacherEnsemble,
    data: Any,
    root: str | os.PathLike[str],
    top_k: int,
    value_bits: int | None = 8,
    tokenizer: Any = None,
    block_size: int | None = None,
    vocab_size: int | None = None,
    chunk_blocks: int = 64,
    batch_size: int = 8,
    input_key: str = "input_ids",
    device: torch.device | str | None = None,
    progress: bool = True,
    missing: Literal["build", "error"] = "build",
) -> SequenceCachedTeachers:
    """Open the sequence cache of ``teachers`` over ``data`` under ``root``, building what is missing.

    Each split's blocks are read in index order, ``batch_size`` at a time; the ensemble runs once
    per batch (every teacher, under ``no_grad``, in eval mode), and each teacher's logits at every
    position are stored as their top ``top_k`` (see
    :mod:`~kd_lightning.teachers.cache.sequence_store`). Blocks are written ``chunk_blocks`` to a
    file; a build killed midway keeps its completed chunks and the next call reuses them (see the
    module's docstring). A progress bar counts the blocks left to run.

    Args:
        teachers: causal LMs returning logits ``(B, L, V)`` for token ids ``(B, L)``.
        data: a datamodule (e.g. :class:`~kd_lightning.data.TextDataModule`: its ``train``,
            ``val`` and ``test`` loaders give the splits' datasets and collate functions, and its
            ``tokenizer``, ``block_size`` and ``vocab_size`` the defaults of those arguments), or a
            mapping of stage (``"train"``, ``"val"``, ``"test"``) to a map-style dataset or a
            ``DataLoader`` (its dataset and collate function). A block's index is its position in
            its split's dataset, as :class:`~kd_lightning.data.indexed.IndexedDataModule` reports
            it. Splits without blocks are not cached.
        root: the directory holding caches; this one goes to ``root/<fingerprint>``.
        top_k: token logits kept per position, ``1 ≤ top_k ≤ V``.
        value_bits: bits per stored logit (``1..16``), or ``None`` for float32 logits (exact).
        tokenizer: the tokenizer of the data (its ``fingerprint``) or that fingerprint; the
            datamodule's by default.
        block_size: tokens per block ``L``; the datamodule's, or the first block's length.
        vocab_size: ``V``, the teachers' output width; the datamodule's or the ensemble's
            ``num_classes`` by default.
        chunk_blocks: blocks per chunk file: the unit of work kept when a build is killed.
        batch_size: blocks per teacher forward; part of the fingerprint (see the module's
            docstring).
        input_key: the key of the token ids in dict batches (tuple batches: their first item).
            With ``"input_ids"``, the teachers read every model-input field of the batch (e.g.
            its ``attention_mask``) as one mapping, as in training with the default
            :class:`~kd_lightning.BatchAdapter`; with another key, the token ids alone.
        device: where the teachers run; the ensemble's device by default.
        progress: show a progress bar.
        missing: ``"error"`` raises :class:`~kd_lightning.teachers.cache.build.StaleCacheError`
            instead of building, naming what differs from the caches under ``root`` (a
            teacher, the tokenizer, the block length, ``top_k``...).

    Examples:
        >>> import tempfile
        >>> from kd_lightning.models.causal_lm import CausalLM
        >>> lm = lambda: CausalLM(vocab_size=300, d_model=16, n_layers=1, n_heads=2, max_len=16)
        >>> ensemble = TeacherEnsemble({"a": lm(), "b": lm(), "c": lm()})
        >>> blocks = [{"input_ids": torch.randint(0, 300, (16,))} for _ in range(10)]
        >>> with tempfile.TemporaryDirectory() as root:
        ...     cache = build_sequence_cache(
        ...         ensemble, {"train": blocks, "val": blocks[:3]}, root, top_k=32,
        ...         tokenizer="demo", vocab_size=300, chunk_blocks=4, progress=False,
        ...     )
        ...     cache.stages, cache.logits("val", [2]).shape, round(cache.bytes_per_token)
        (['train', 'val'], torch.Size([3, 1, 16, 300]), 67)
    """
    splits = _splits(data)
    tokenizer = tokenizer if tokenizer is not None else getattr(data, "tokenizer", None)
    tokenizer_key = getattr(tokenizer, "fingerprint", tokenizer)
    if not isinstance(tokenizer_key, str):
        raise ValueError(
            "pass tokenizer= (the data's tokenizer or its fingerprint): a cache read with another "
            "tokenizer's ids would be silently wrong, so the cache records it"
        )
    block_size = _first_given(block_size, getattr(data, "block_size", None))
    if block_size is None:
        dataset, _ = next(iter(splits.values()))
        block_size = len(_inputs(dataset[0], input_key))
    vocab_size = _first_given(vocab_size, getattr(data, "vocab_size", None), teachers.num_classes)
    if vocab_size is None:
        raise ValueError("pass vocab_size= (the teachers' output width V)")
    check_layout(vocab_size, top_k, value_bits)
    for name, value in (("chunk_blocks", chunk_blocks), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    description = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "teachers": [
            {"name": name, "fingerprint": teacher_fingerprint(teachers, name)}
            for name in teachers.names
        ],
        "tokenizer": tokenizer_key,
        "block_size": block_size,
        "vocab_size": vocab_size,
        "top_k": top_k,
        "value_bits": value_bits,
        "chunk_blocks": chunk_blocks,
        "batch_size": batch_size,
        "data": {split: dataset_fingerprint(dataset) for split, (dataset, _) in splits.items()},
    }
    key = cache_key(description)
    root = Path(root)
    final = root / key
    if (final / MANIFEST).is_file():
        return SequenceCachedTeachers(final, expected_fingerprint=key)
    if final.exists():
        raise CorruptCacheError(f"{final} exists without a {MANIFEST}: delete it to rebuild")
    if missing == "error":
        raise StaleCacheError(_stale_message(root, key, description))
    if missing != "build":
        raise ValueError(f"missing must be 'build' or 'error', got {missing!r}")
    partial = root / f"{PARTIAL_PREFIX}{key}"
    partial.mkdir(parents=True, exist_ok=True)
    dtype = block_dtype(len(teachers), block_size, vocab_size, top_k, value_bits)
    chunks = {
        split: [
            range(start, min(start + chunk_blocks, len(dataset)))  # type: ignore[arg-type]
            for start in range(0, len(dataset), chunk_blocks)  # type: ignore[arg-type]
        ]
        for split, (dataset, _) in splits.items()
    }
    todo = [
        (split, index, blocks)
        for split, ranges in chunks.items()
        for index, blocks in enumerate(ranges)
        if not _is_complete(partial / chunk_name(split, index), len(blocks), dtype)
    ]
    target = torch.device(device) if device is not None else teachers.device
    teachers.to(target)

    def write(split: str, index: int, blocks: range, bar: tqdm) -> None:
        dataset, collate_fn = splits[split]
        loader = DataLoader(
            Subset(dataset, blocks), batch_size=batch_size, shuffle=False, collate_fn=collate_fn
        )
        records = np.zeros(len(blocks), dtype=dtype)
        start = 0
        for batch in loader:
            inputs = _inputs(batch, input_key)
            if inputs.ndim != 2 or inputs.shape[1] != block_size:
                raise ValueError(
                    f"split {split!r}: blocks of shape {tuple(inputs.shape[1:])}, expected "
                    f"({block_size},) token ids"
                )
            logits = teachers(_model_inputs(batch, input_key, target))  # (K, B, L, V)
            if logits.shape[-1] != vocab_size:
                raise ValueError(
                    f"the teachers output {logits.shape[-1]} logits per token, the cache is for "
                    f"vocab_size={vocab_size}"
                )
            stop = start + len(inputs)
            records["input_crc"][start:stop] = input_checksums(inputs)
            for teacher, teacher_logits in enumerate(logits):
                records["rows"][start:stop, teacher] = encode_rows(
                    teacher_logits, top_k, value_bits
                )
            bar.update(len(inputs))
            start = stop
        records["checksum"] = checksum(records)
        _write_atomically(
            partial / chunk_name(split, index),
            lambda file: np.save(file, records, allow_pickle=False),
        )

    try:
        with tqdm(
            total=sum(len(blocks) for _, _, blocks in todo),
            desc=f"sequence cache {key[:8]}",
            unit="block",
            disable=not progress,
        ) as bar:
            for split, index, blocks in todo:
                write(split, index, blocks, bar)
        manifest = {
            **description,
            "fingerprint": key,
            "splits": {
                split: {
                    "num_blocks": ranges[-1].stop,
                    "chunks": [
                        {"bytes": (partial / chunk_name(split, index)).stat().st_size}
                        for index in range(len(ranges))
                    ],
                }
                for split, ranges in chunks.items()
            },
        }
        text = (json.dumps(manifest, indent=2) + "\n").encode()
        _write_atomically(partial / MANIFEST, lambda file: file.write(text))
        sync_directory(partial)
        os.rename(partial, final)
    except CacheWriteError as error:
        error.args = (
            f"{error}; the finished chunks stay in {partial}, which no reader opens, for the "
            "next build to reuse",
        )
        raise
    except OSError:
        if not (final / MANIFEST).is_file():
            raise  # not a concurrent builder that completed this cache first: a real failure
    return SequenceCachedTeachers(final, expected_fingerprint=key)


def _stale_message(root: Path, key: str, description: Mapping[str, Any]) -> str:
    """Why no sequence cache under ``root`` is usable: for each one of the same teachers, what
    differs (a teacher's weights, the tokenizer, block length, layout or data), old → new."""
    lines = [f"no sequence cache {root / key} for these teachers and data"]
    names = [teacher["name"] for teacher in description["teachers"]]
    for path in sorted(root.glob(f"*/{MANIFEST}")):
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if old.get("format") != FORMAT or [t["name"] for t in old.get("teachers", [])] != names:
            continue
        changed = [
            f"teacher '{new['name']}'"
            for new, before in zip(description["teachers"], old["teachers"], strict=True)
            if new["fingerprint"] != before.get("fingerprint")
        ]
        changed += [
            f"{option} ({old.get(option)!r} → {description[option]!r})"
            for option in ("tokenizer", "block_size", "vocab_size", "top_k", "value_bits")
            if old.get(option) != description[option]
        ]
        changed += [
            f"data split '{split}'"
            for split, digest in description["data"].items()
            if old.get("data", {}).get(split) != digest
        ]
        lines.append(f"  {path.parent.name} differs: {', '.join(changed) or 'chunking'}")
    lines.append("build it (allow building, or run `kd-cache`) before training from the cache")
    return "\n".join(lines)


def _first_given(*values: Any) -> Any:
    return next((value for value in values if value is not None), None)


def _splits(data: Any) -> dict[str, Split]:
    """Stage → (dataset, collate function) of every split of ``data`` that holds blocks."""
    if isinstance(data, Mapping):
        unknown = sorted(set(map(str, data)) - set(STAGES))
        if unknown:
            raise ValueError(f"unknown stages {unknown}; stages are {list(STAGES)}")
        items = dict(data)
    elif callable(getattr(data, "setup", None)) and callable(getattr(data, "val_dataloader", None)):
        data.setup("fit")
        data.setup("test")
        items = {stage: getattr(data, f"{stage}_dataloader")() for stage in STAGES}
    else:
        raise TypeError(
            f"data must be a datamodule or a mapping of stage to dataset or DataLoader, got "
            f"{type(data).__name__}"
        )
    splits: dict[str, Split] = {}
    for stage, item in items.items():
        split = (item.dataset, item.collate_fn) if isinstance(item, DataLoader) else (item, None)
        if len(split[0]):  # type: ignore[arg-type]
            splits[stage] = split
    if not splits:
        raise ValueError("no split holds a block: there is nothing to cache")
    return splits


def _inputs(batch: Any, input_key: str) -> Tensor:
    inputs = batch[input_key] if isinstance(batch, Mapping) else batch[0]
    if not isinstance(inputs, Tensor) or inputs.is_floating_point():
        raise ValueError(
            f"the teachers read token ids, got {type(inputs).__name__} "
            f"{getattr(inputs, 'dtype', '')} (input_key={input_key!r})"
        )
    return inputs


def _model_inputs(batch: Any, input_key: str, device: torch.device) -> Any:
    """What the teachers read, on ``device``: the model-input fields of a Hugging Face style
    batch as one mapping, as :class:`~kd_lightning.BatchAdapter` gives them in training, or
    the token ids alone (another ``input_key``, a tuple batch)."""
    if isinstance(batch, Mapping) and input_key == "input_ids":
        return {key: batch[key].to(device) for key in MODEL_INPUT_KEYS if key in batch}
    return _inputs(batch, input_key).to(device)


def _is_complete(path: Path, blocks: int, dtype: np.dtype) -> bool:
    """Whether ``path`` is a whole chunk of ``blocks`` records of ``dtype``, every checksum sound."""
    try:
        shape, found, offset = read_header(path)
        if shape != (blocks,) or found != dtype:
            return False
        if path.stat().st_size != offset + blocks * dtype.itemsize:
            return False
        records = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return False
    return bool((checksum(records) == records["checksum"]).all())


def _write_atomically(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """``write`` into a temporary file beside ``path``, synced, then moved onto ``path``; a
    failed write leaves no file and raises a
    :class:`~kd_lightning.teachers.cache.parts.CacheWriteError` naming ``path``."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with writing(path), open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
