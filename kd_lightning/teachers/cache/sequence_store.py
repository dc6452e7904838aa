"""A random-access store of K teachers' sparse next-token outputs over packed LM blocks.

For every block of every cached split, every teacher and every position, the store holds the
teacher's top-k logits, their token ids and the log-mass of the other ``V − k`` tokens, read back
by (block index, position) from memory-mapped files. Because all K teachers sit side by side, the
fusion rule (and the temperature) can change at read time without running a teacher again.
:func:`~kd_lightning.teachers.cache.sequence_build.build_sequence_cache` writes it.

Layout of one cache, ``<root>/<fingerprint>/``::

    manifest.json            written last: what the fingerprint hashes, splits, chunk files
    <split>.<c:05d>.npy      blocks [c·C, min((c+1)·C, N)) of the split: one record per block

Each chunk file is a 1-D NumPy ``.npy`` array (read with ``mmap_mode="r"``, no pickle) of block
records, so any tool can open it::

    block = (checksum <u4, input_crc <u4, rows: row[K, L])     teacher-major, then position
    row   = (ids u1[I], top <f4, step <f4, tail <f4, codes u1[Q])   value_bits = b in 1..16
    row   = (ids u1[I], tail <f4, values <f4[k])                     value_bits = None (exact)

* ``ids``: the row's top-k token ids **sorted by id**, Elias-Fano coded (Elias 1974, Fano 1971)
  in a fixed ``I`` bytes: with ``l = ⌊log2(V/k)⌋``, the ``k`` low parts ``id & (2^l − 1)`` take
  ``l`` bits each, and the high parts ``id >> l`` a unary bitmap of ``U = k + ((V−1) >> l) + 1``
  bits (bit ``(id_i >> l) + i`` set): ``I = ⌈(U + k·l) / 8⌉`` bytes, about ``k·(2 + log2(V/k))``
  bits, near the ``log2 C(V, k)`` bits any code of a k-subset needs, against ``k·⌈log2 V⌉`` for
  fixed-width ids. Every row has the same size, so a block is found by arithmetic alone.
* ``top``, ``step``, ``codes``: the top-k logits ``z_i`` quantised to ``b`` bits relative to the
  row's largest logit, ``code_i = round((top − z_i) / step)`` with ``step = (top − z_(k)) /
  (2^b − 1)`` (``z_(k)``: the k-th largest logit), bit-packed in ``Q = ⌈k·b / 8⌉`` bytes; read back
  as ``top − code_i · step``. ``values`` (exact mode): the float32 logits themselves.
* ``tail``: float32 ``logsumexp`` of the ``V − k`` logits outside the top k (``-inf`` at k = V),
  computed from the tail's own logits, as :func:`~kd_lightning.teachers.cache.topk.compress_topk`.
* ``checksum``: CRC-32 of the record's bytes after it (``input_crc`` and ``rows``), checked on
  every read; ``input_crc``: CRC-32 of the block's ``input_ids`` as little-endian int64, checked
  against the batch's tokens so that a cache read with other data is refused.

**Bytes per token per teacher**: ``I + Q + 12`` (``b`` bits) or ``I + 4k + 4`` (exact), plus
``8 / (K·L)`` per block and each file's ``.npy`` header (a few hundred bytes per chunk). At
``k = 128`` a row takes 268 B for ``V = 8192`` and ``b = 8``, and exactly 300 B for ``V = 32768``
at ``b = 8``, ``V = 65536`` at ``b = 7`` and Llama 3's ``V = 128256`` at ``b = 6``. For comparison, DistillKit's recommended capture (arcee-ai/DistillKit,
README: ``k = 128``, 16 exact bf16 log-probs and a polynomial for the rest, "~300 bytes/token")
spends ``⌈log2 V⌉`` bits per id (``compression/config.py``, ``total_bits``): 272 B of ids alone at
``V = 128256``, where Elias-Fano needs 192 B; and it caches one teacher, where this store keeps K.

**Error.** Read back, every logit is what :func:`~kd_lightning.teachers.cache.topk.expand_topk`
makes of the exact top k (its logit at each top-k id, ``tail − log(V − k)`` at every other id),
except that each top-k logit is off by at most ``step / 2`` (plus float32 rounding; the row's
largest logit comes back exact). After the softmax, every log-probability is therefore within
``step = (top − z_(k)) / (2^b − 1)`` of its value from exact top-k logits (within ``step / T`` at
temperature ``T``): e.g. 0.04 nats for a 10-nat spread over the top 128 at 8 bits.
``value_bits=None`` stores float32 logits and has no quantisation error: at ``k = V`` the cache
gives back the teachers' logits bit for bit. The truncation to the top k, not the quantisation,
dominates the error of a KD loss read from the cache: on a slice of the standard library
(``tests/test_sequence_cache.py``, the slow test), 8 bits at ``k = V`` moved the KD term by at
most 1e-4, while ``k = 128`` moved it by 10 % at T = 1 for teachers whose top 128 tokens held
about 70 % of the probability (more at higher T, where the evenly spread tail weighs more).
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from tokenize import TokenError
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kd_lightning.teachers.cache.fingerprint import fingerprint
from kd_lightning.teachers.cache.indices import sample_indices
from kd_lightning.teachers.cache.store import (
    MANIFEST,
    PARTIAL_PREFIX,
    CorruptCacheError,
    StoredOutputs,
)
from kd_lightning.teachers.cache.topk import (
    TopKLogits,
    TopKTeacherOutputs,
    compress_topk,
    expand_topk,
)
from kd_lightning.teachers.source import Stage, TeacherOutputs

FORMAT = "kd-sequence-cache"
FORMAT_VERSION = 1
DESCRIPTION_KEYS = (
    "format",
    "version",
    "teachers",
    "tokenizer",
    "block_size",
    "vocab_size",
    "top_k",
    "value_bits",
    "chunk_blocks",
    "batch_size",
    "data",
)
"""The manifest entries the cache's fingerprint (its directory name) hashes."""


class MismatchedCacheError(ValueError):
    """A sound cache built for other data: another tokenizer, block length, vocabulary or tokens."""


def low_bits(vocab_size: int, top_k: int) -> int:
    """``l = ⌊log2(V / k)⌋``, the bits of each id's low part in the Elias-Fano code.

    Examples:
        >>> low_bits(8192, 128), low_bits(258, 128), low_bits(10, 10)
        (6, 1, 0)
    """
    return (vocab_size // top_k).bit_length() - 1


def id_bytes(vocab_size: int, top_k: int) -> int:
    """``I``, the bytes of one row's Elias-Fano coded top-k ids.

    Examples:
        >>> id_bytes(8192, 128), id_bytes(65536, 128), id_bytes(128256, 128)
        (128, 176, 192)
    """
    low = low_bits(vocab_size, top_k)
    return -(-(top_k + ((vocab_size - 1) >> low) + 1 + top_k * low) // 8)


def row_dtype(vocab_size: int, top_k: int, value_bits: int | None) -> np.dtype:
    """The record of one (teacher, position): ids, then the values (see the module's docstring).

    Examples:
        >>> row_dtype(8192, 128, 8).itemsize, row_dtype(8192, 128, None).itemsize
        (268, 644)
    """
    check_layout(vocab_size, top_k, value_bits)
    ids = ("ids", np.uint8, (id_bytes(vocab_size, top_k),))
    if value_bits is None:
        return np.dtype([ids, ("tail", "<f4"), ("values", "<f4", (top_k,))])
    codes = ("codes", np.uint8, (-(-top_k * value_bits // 8),))
    return np.dtype([ids, ("top", "<f4"), ("step", "<f4"), ("tail", "<f4"), codes])


def block_dtype(
    num_teachers: int, block_size: int, vocab_size: int, top_k: int, value_bits: int | None
) -> np.dtype:
    """The record of one block: two CRC-32s, then ``rows[K, L]``."""
    rows = row_dtype(vocab_size, top_k, value_bits)
    return np.dtype(
        [("checksum", "<u4"), ("input_crc", "<u4"), ("rows", rows, (num_teachers, block_size))]
    )


def check_layout(vocab_size: int, top_k: int, value_bits: int | None) -> None:
    """Raise ``ValueError`` unless ``1 ≤ k ≤ V`` and ``value_bits`` is ``None`` or in ``1..16``."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k must lie in [1, {vocab_size}] (the vocabulary), got {top_k!r}")
    if value_bits is not None and (
        isinstance(value_bits, bool) or not isinstance(value_bits, int) or not 1 <= value_bits <= 16
    ):
        raise ValueError(f"value_bits must be None (float32) or in 1..16, got {value_bits!r}")


def pack_bits(values: np.ndarray, width: int) -> np.ndarray:
    """Unsigned integers ``(..., n)`` below ``2^width`` as ``⌈n·width / 8⌉`` bytes, most
    significant bit first.

    Examples:
        >>> pack_bits(np.array([[1, 2, 3]]), 2)  # 01 10 11, padded with zeros
        array([[108]], dtype=uint8)
        >>> unpack_bits(pack_bits(np.array([[5, 0, 7]]), 3), 3, 3)
        array([[5, 0, 7]])
    """
    if width == 8:
        return values.astype(np.uint8)
    shifts = np.arange(width - 1, -1, -1, dtype=np.int64)
    bits = (values.astype(np.int64)[..., None] >> shifts) & 1
    return np.packbits(bits.reshape(*values.shape[:-1], -1).astype(np.uint8), axis=-1)


def unpack_bits(packed: np.ndarray, count: int, width: int) -> np.ndarray:
    """The ``count`` integers of ``width`` bits each that :func:`pack_bits` packed, as int64."""
    if width == 8:
        return packed[..., :count].astype(np.int64)
    return _bits_to_int(np.unpackbits(packed, axis=-1, count=count * width), count, width)


def _bits_to_int(bits: np.ndarray, count: int, width: int) -> np.ndarray:
    """Bits ``(..., count·width)``, most significant first, as ``count`` int64s."""
    grouped = bits.reshape(*bits.shape[:-1], count, width)
    out = grouped[..., 0].astype(np.int64)
    for bit in range(1, width):
        out <<= 1
        out |= grouped[..., bit]
    return out


def encode_ids(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """Elias-Fano code ``(..., I)`` of ids ``(..., k)`` sorted ascending, each row distinct.

    Examples:
        >>> ids = np.array([[0, 3, 4, 9]])
        >>> code = encode_ids(ids, 10)
        >>> code.shape, decode_ids(code, 4, 10)
        ((1, 2), array([[0, 3, 4, 9]]))
    """
    shape, top_k = ids.shape[:-1], ids.shape[-1]
    rows = ids.reshape(-1, top_k).astype(np.int64)
    low = low_bits(vocab_size, top_k)
    upper = np.zeros((len(rows), top_k + ((vocab_size - 1) >> low) + 1), dtype=np.uint8)
    np.put_along_axis(upper, (rows >> low) + np.arange(top_k), 1, axis=-1)
    shifts = np.arange(low - 1, -1, -1, dtype=np.int64)
    lows = ((rows[..., None] >> shifts) & 1).reshape(len(rows), -1).astype(np.uint8)
    code = np.packbits(np.concatenate([upper, lows], axis=-1), axis=-1)
    return code.reshape(*shape, code.shape[-1])


def decode_ids(code: np.ndarray, top_k: int, vocab_size: int) -> np.ndarray:
    """The ids ``(..., k)``, ascending, that :func:`encode_ids` coded in ``code`` ``(..., I)``."""
    shape = code.shape[:-1]
    low = low_bits(vocab_size, top_k)
    upper_bits = top_k + ((vocab_size - 1) >> low) + 1
    bits = np.unpackbits(code.reshape(-1, code.shape[-1]), axis=-1, count=upper_bits + top_k * low)
    rows = len(bits)
    # The set bits of all rows' bitmaps in one flat scan, then in-place arithmetic on that one
    # array: several times faster than a 2-D nonzero and fresh arrays (kd-bench --lm reads a
    # batch's ids at every step).
    flat = np.flatnonzero(np.ascontiguousarray(bits[:, :upper_bits]).view(bool))
    if len(flat) != rows * top_k:
        raise CorruptCacheError(
            f"an id code holds {len(flat)} ids for {rows} rows of {top_k}: corrupt data"
        )
    ids = flat.reshape(rows, top_k)
    ids -= np.arange(rows, dtype=np.int64)[:, None] * upper_bits  # positions in each row
    if rows and (ids[:, 0].min() < 0 or ids[:, -1].max() >= upper_bits):
        raise CorruptCacheError(f"an id code holds other than {top_k} ids in a row: corrupt data")
    ids -= np.arange(top_k)  # the high parts
    if low:
        ids <<= low
        ids |= _bits_to_int(bits[:, upper_bits:], top_k, low)
    return ids.reshape(*shape, top_k)


def checksum(records: np.ndarray) -> np.ndarray:
    """The CRC-32 of each block record's bytes after its ``checksum`` field, ``(n,)`` uint32."""
    raw = np.ascontiguousarray(records).view(np.uint8).reshape(len(records), -1)
    return np.array([zlib.crc32(row[4:].data) for row in raw], dtype=np.uint32)


def input_checksums(input_ids: Tensor | np.ndarray) -> np.ndarray:
    """CRC-32 of each block's token ids ``(B, L)`` as little-endian int64, ``(B,)`` uint32.

    Examples:
        >>> first, again, other = input_checksums(torch.tensor([[1, 2], [1, 2], [2, 1]]))
        >>> bool(first == again), bool(first == other)
        (True, False)
    """
    tokens = input_ids.cpu().numpy() if isinstance(input_ids, Tensor) else input_ids
    rows = np.ascontiguousarray(tokens, dtype="<i8")
    return np.array([zlib.crc32(row.data) for row in rows], dtype=np.uint32)


def cache_key(manifest: Mapping[str, Any]) -> str:
    """The fingerprint of what a manifest describes: the name of the cache's directory."""
    return fingerprint({key: manifest.get(key) for key in DESCRIPTION_KEYS})


def chunk_name(split: str, chunk: int) -> str:
    """The file of chunk ``chunk`` of ``split``, e.g. ``train.00003.npy``."""
    return f"{split}.{chunk:05d}.npy"


def read_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """The shape, dtype and data offset written in a ``.npy`` file's header.

    Raises:
        OSError: the file cannot be read.
        ValueError: the header is not that of a C-ordered ``.npy`` array.
    """
    with open(path, "rb") as file:
        try:
            version = np.lib.format.read_magic(file)
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read(file)
        except (ValueError, SyntaxError, TokenError) as error:  # the header is parsed as Python
            raise ValueError(f"unreadable .npy header ({error})") from error
        if fortran:
            raise ValueError("a Fortran-ordered array")
        return shape, dtype, file.tell()


class SequenceCachedTeachers(StoredOutputs):
    """K teachers' top-k next-token logits for packed LM blocks, read by (block, position).

    The offline stand-in for a :class:`~kd_lightning.teachers.TeacherEnsemble` of causal LMs:
    ``logits(stage, blocks)`` returns the dense float32 ``(K, B, L, V)`` logits rebuilt from each
    teacher's top k and tail mass (:func:`~kd_lightning.teachers.cache.topk.expand_topk`: the tail
    spread evenly over the other ``V − k`` tokens), and ``topk(stage, blocks)`` the sparse form.
    As a :class:`~kd_lightning.teachers.source.TeacherSource`, :meth:`outputs` reads the batch's
    block indices (``batch["index"]``, as
    :class:`~kd_lightning.data.indexed.IndexedDataModule` adds them) and checks the batch's
    tokens against those the cache was built on. The layout is in the module's docstring.
    With ``sparse=True`` (the default) those outputs are :class:`TopKTeacherOutputs`: the top-k
    form, expanded to dense logits only if they are read. A
    :class:`~kd_lightning.DistillationLoss` that
    :attr:`~kd_lightning.DistillationLoss.accepts_topk` computes its KD term from it
    (:mod:`kd_lightning.losses.sparse`) and the agreement metrics expand a chunk of tokens at a
    time, so that no step holds the dense ``(K, B, L, V)``.

    Opening checks the manifest (format, fingerprint), each chunk file's size and header, and the
    tokenizer, block length and vocabulary given; every read checks the checksum of each block it
    reads (``verify=True`` checks every block at once). Memory maps open lazily, after pickling
    too (DDP spawn, dataloader workers).

    Args:
        path: a cache directory written by
            :func:`~kd_lightning.teachers.cache.sequence_build.build_sequence_cache`.
        tokenizer: refuse a cache built with another tokenizer: a tokenizer (its
            ``fingerprint``, a hash of its vocabulary and merges) or the fingerprint itself.
        block_size: refuse a cache of blocks of another length.
        vocab_size: refuse a cache whose teachers have another vocabulary than the student.
        expected_fingerprint: refuse the cache unless it carries this fingerprint.
        verify: check the checksum of every block now (reads the whole cache).
        sparse: hand :meth:`outputs`'s top-k form to the loss too; ``False``: dense logits only.

    Raises:
        CorruptCacheError: a partial, truncated or altered cache.
        MismatchedCacheError: a cache of another tokenizer, block length or vocabulary.

    Examples:
        >>> import tempfile
        >>> from kd_lightning.models.causal_lm import CausalLM
        >>> from kd_lightning.teachers import TeacherEnsemble
        >>> from kd_lightning.teachers.cache.sequence_build import build_sequence_cache
        >>> _ = torch.manual_seed(0)
        >>> lm = lambda: CausalLM(vocab_size=40, d_model=16, n_layers=1, n_heads=2, max_len=8)
        >>> ensemble = TeacherEnsemble({"a": lm(), "b": lm()})
        >>> blocks = [{"input_ids": torch.randint(0, 40, (8,))} for _ in range(6)]
        >>> root = tempfile.TemporaryDirectory()
        >>> cache = build_sequence_cache(
        ...     ensemble, {"train": blocks}, root.name, top_k=40, value_bits=None,
        ...     tokenizer="demo", vocab_size=40, progress=False,
        ... )
        >>> cache = SequenceCachedTeachers(cache.path, tokenizer="demo", block_size=8)
        >>> cache.names, cache.logits("train", [4, 1]).shape
        (['a', 'b'], torch.Size([2, 2, 8, 40]))
        >>> live = ensemble(torch.stack([blocks[4]["input_ids"], blocks[1]["input_ids"]]))
        >>> torch.equal(cache.logits("train", [4, 1]), live)  # k = V, float32: exact
        True
        >>> batch = {"input_ids": torch.zeros(1, 8, dtype=torch.long), "index": torch.tensor([0])}
        >>> cache.outputs(batch["input_ids"], batch, "train")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        kd_lightning.teachers.cache.sequence_store.MismatchedCacheError: block 0 of split 'train' ...
        >>> root.cleanup()
    """

    kind = "a sequence cache"

    def __init__(
        self,
        path: str | os.PathLike[str],
        tokenizer: Any = None,
        block_size: int | None = None,
        vocab_size: int | None = None,
        expected_fingerprint: str | None = None,
        verify: bool = False,
        sparse: bool = True,
    ) -> None:
        self.path = Path(path)
        self.sparse = sparse
        if self.path.name.startswith(PARTIAL_PREFIX):
            raise CorruptCacheError(f"{self.path} is a partial build, never read")
        try:
            self.manifest = json.loads((self.path / MANIFEST).read_text())
        except FileNotFoundError:
            raise CorruptCacheError(
                f"{self.path} has no {MANIFEST}: not a complete cache"
            ) from None
        except ValueError as error:
            raise CorruptCacheError(f"{self.path / MANIFEST} is not valid JSON: {error}") from None
        if (self.manifest.get("format"), self.manifest.get("version")) != (FORMAT, FORMAT_VERSION):
            raise CorruptCacheError(
                f"{self.path}: not a {FORMAT} of version {FORMAT_VERSION} (found "
                f"{self.manifest.get('format')!r} version {self.manifest.get('version')!r})"
            )
        key = self.manifest.get("fingerprint")
        expected = expected_fingerprint or self.path.name
        if key != self.path.name or key != expected or cache_key(self.manifest) != key:
            raise CorruptCacheError(
                f"{self.path / MANIFEST} holds fingerprint {key!r} and describes a cache "
                f"{cache_key(self.manifest)!r}, expected {expected!r}: altered or misplaced; "
                f"delete {self.path} to rebuild"
            )
        self.block_size: int = self.manifest["block_size"]
        self.vocab_size: int = self.manifest["vocab_size"]
        self.top_k: int = self.manifest["top_k"]
        self.value_bits: int | None = self.manifest["value_bits"]
        self.chunk_blocks: int = self.manifest["chunk_blocks"]
        given_tokenizer = getattr(tokenizer, "fingerprint", tokenizer)
        for what, built, given in (
            ("tokenizer", self.manifest["tokenizer"], given_tokenizer),
            ("block length", self.block_size, block_size),
            ("vocabulary size", self.vocab_size, vocab_size),
        ):
            if given is not None and given != built:
                raise MismatchedCacheError(
                    f"{self.path} was built with {what} {built!r}, but this run uses {given!r}: "
                    f"build a cache for this {what}"
                )
        self.dtype = block_dtype(
            len(self), self.block_size, self.vocab_size, self.top_k, self.value_bits
        )
        for split in self.manifest["splits"]:
            for chunk in range(len(self.manifest["splits"][split]["chunks"])):
                self._check_file(split, chunk)
        self._maps: dict[tuple[str, int], np.ndarray] = {}
        if verify:
            self.verify()

    def num_blocks(self, stage: str) -> int:
        """The number of blocks of split ``stage``."""
        return int(self._split(stage)["num_blocks"])

    @property
    def nbytes(self) -> int:
        """Bytes on disk of the chunk files (headers included)."""
        return sum(
            chunk["bytes"]
            for split in self.manifest["splits"].values()
            for chunk in split["chunks"]
        )

    @property
    def bytes_per_token(self) -> float:
        """Bytes on disk per token per teacher, every overhead included."""
        blocks = sum(split["num_blocks"] for split in self.manifest["splits"].values())
        return self.nbytes / (blocks * self.block_size * len(self))

    def _split(self, stage: str) -> dict[str, Any]:
        try:
            return self.manifest["splits"][stage]  # type: ignore[no-any-return]
        except KeyError:
            raise KeyError(
                f"stage {stage!r} is not cached in {self.path}; cached: {self.stages}"
            ) from None

    def _check_file(self, split: str, chunk: int) -> None:
        """Refuse a chunk file of another size or header than the manifest says."""
        entry = self.manifest["splits"][split]["chunks"][chunk]
        path = self.path / chunk_name(split, chunk)
        blocks = min(self.chunk_blocks, self.num_blocks(split) - chunk * self.chunk_blocks)
        try:
            size = path.stat().st_size
            shape, dtype, offset = read_header(path)
        except (OSError, ValueError) as error:
            raise CorruptCacheError(f"{path}: {error}; delete {self.path} to rebuild") from error
        if size != entry["bytes"] or size != offset + blocks * self.dtype.itemsize:
            raise CorruptCacheError(
                f"{path} holds {size} bytes, the manifest {entry['bytes']} "
                f"({blocks} blocks of {self.dtype.itemsize} bytes): truncated or altered; "
                f"delete {self.path} to rebuild"
            )
        if shape != (blocks,) or dtype != self.dtype:
            raise CorruptCacheError(
                f"{path} holds {shape} records of another layout than the manifest's {(blocks,)}: "
                f"altered; delete {self.path} to rebuild"
            )

    def _chunk(self, split: str, chunk: int) -> np.ndarray:
        key = (split, chunk)
        if key not in self._maps:
            path = self.path / chunk_name(split, chunk)
            self._maps[key] = np.load(path, mmap_mode="r", allow_pickle=False)
        return self._maps[key]

    def records(self, stage: str, blocks: Tensor | np.ndarray | Sequence[int]) -> np.ndarray:
        """The raw block records ``(B,)`` of ``blocks`` of ``stage``, their checksums checked."""
        indices = np.asarray(
            blocks.cpu().numpy() if isinstance(blocks, Tensor) else blocks, dtype=np.int64
        ).reshape(-1)
        size = self.num_blocks(stage)
        if indices.size and (indices.min() < 0 or indices.max() >= size):
            raise IndexError(
                f"block indices {indices.min()}..{indices.max()} outside the {stage!r} split of "
                f"{size} blocks"
            )
        out = np.empty(len(indices), dtype=self.dtype)
        chunks = indices // self.chunk_blocks
        for chunk in np.unique(chunks):
            where = np.nonzero(chunks == chunk)[0]
            out[where] = self._chunk(stage, int(chunk))[indices[where] % self.chunk_blocks]
        bad = np.nonzero(checksum(out) != out["checksum"])[0]
        if bad.size:
            block = int(indices[bad[0]])
            raise CorruptCacheError(
                f"block {block} of split {stage!r} fails its checksum in "
                f"{self.path / chunk_name(stage, block // self.chunk_blocks)}: altered data; "
                f"delete {self.path} to rebuild"
            )
        return out

    def topk(
        self,
        stage: str,
        blocks: Tensor | np.ndarray | Sequence[int],
        positions: slice | Sequence[int] | None = None,
    ) -> TopKLogits:
        """The sparse outputs of ``blocks`` at ``positions`` (all by default): ``values`` and
        ``indices`` ``(K, B, P, k)`` (float32 logits, int64 ids, ascending by id) and
        ``tail_logsumexp`` ``(K, B, P)``, views of memory laid out positions first."""
        return self._decode(self.records(stage, blocks), positions)

    def _decode(
        self, records: np.ndarray, positions: slice | Sequence[int] | None = None
    ) -> TopKLogits:
        rows = records["rows"]  # (B, K, L)
        if positions is not None:
            rows = rows[:, :, positions]
        # Decoded positions first, (B, P, K), and handed out as (K, B, P) views of that memory:
        # the sparse KD loss reads every teacher at each position without a copy.
        rows = np.ascontiguousarray(rows.transpose(0, 2, 1))
        ids = decode_ids(rows["ids"], self.top_k, self.vocab_size)
        if self.value_bits is None:
            values = rows["values"].copy()
        else:
            values = unpack_bits(rows["codes"], self.top_k, self.value_bits).astype(np.float32)
            values *= -rows["step"][..., None]  # top − code · step, in place
            values += rows["top"][..., None]
        return TopKLogits(
            values=torch.from_numpy(values).permute(2, 0, 1, 3),
            indices=torch.from_numpy(ids).permute(2, 0, 1, 3),
            tail_logsumexp=torch.from_numpy(rows["tail"].copy()).permute(2, 0, 1),
            num_classes=self.vocab_size,
        )

    def logits(
        self,
        stage: str,
        blocks: Tensor | np.ndarray | Sequence[int],
        positions: slice | Sequence[int] | None = None,
    ) -> Tensor:
        """Dense float32 logits ``(K, B, P, V)`` of ``blocks`` at ``positions`` (all by default),
        rebuilt from the top k and the tail mass spread evenly over the other ``V − k`` tokens."""
        return expand_topk(self.topk(stage, blocks, positions))

    def outputs(self, inputs: Any, batch: Any, stage: Stage) -> TeacherOutputs:
        """Every teacher's cached logits ``(K, B, L, V)`` for the batch's blocks (their indices
        read from ``batch["index"]``), on the device of ``inputs``: the ``(B, L)`` token ids, or
        a mapping of model inputs holding them as ``"input_ids"``; with ``sparse``, a
        :class:`TopKTeacherOutputs` of their top-k form, expanded only if its ``logits`` are read.

        Raises:
            MismatchedCacheError: ``inputs`` are not the tokens the cache was built on.
        """
        indices = sample_indices(batch)
        if isinstance(inputs, Mapping) and "input_ids" in inputs:
            inputs = inputs["input_ids"]
        if not isinstance(inputs, Tensor) or inputs.ndim != 2 or inputs.is_floating_point():
            keys = f" with keys {sorted(inputs)}" if isinstance(inputs, Mapping) else ""
            raise MismatchedCacheError(
                f"a sequence cache reads (B, L) token ids as inputs, or a mapping holding them as "
                f"'input_ids', got {type(inputs).__name__}{keys} "
                f"{tuple(getattr(inputs, 'shape', ()))}"
            )
        if inputs.shape[1] != self.block_size:
            raise MismatchedCacheError(
                f"{self.path} holds blocks of {self.block_size} tokens, the batch blocks of "
                f"{inputs.shape[1]}"
            )
        records = self.records(stage, indices)
        stale = np.nonzero(input_checksums(inputs) != records["input_crc"])[0]
        if stale.size:
            raise MismatchedCacheError(
                f"block {int(indices[stale[0]])} of split {stage!r} holds other tokens than when "
                f"{self.path} was built: the data changed (or the batch's indices are not its "
                f"blocks' positions in the split); rebuild the cache"
            )
        topk = self._decode(records).to(inputs.device)
        ran = tuple(range(len(self)))
        if not self.sparse:
            return TeacherOutputs(expand_topk(topk), ran)
        return TopKTeacherOutputs(topk, ran)

    def verify(self) -> int:
        """Check every block's checksum; return the number of blocks checked.

        Raises:
            CorruptCacheError: naming the first block that fails.
        """
        checked = 0
        for stage in self.stages:
            size = self.num_blocks(stage)
            for start in range(0, size, self.chunk_blocks):
                self.records(stage, np.arange(start, min(start + self.chunk_blocks, size)))
                checked += min(self.chunk_blocks, size - start)
        return checked

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": {}}

    def __repr__(self) -> str:
        bits = "float32" if self.value_bits is None else f"{self.value_bits} bits"
        return (
            f"SequenceCachedTeachers({str(self.path)!r}, teachers={self.names}, "
            f"top_k={self.top_k}, values={bits}, V={self.vocab_size}, L={self.block_size})"
        )


def quantise(values: Tensor, value_bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(top, step, codes)`` of top-k logits ``values`` ``(..., k)``, in decreasing order.

    Codes are rounded against the float32 ``top`` and ``step`` that are stored, so that each logit
    read back as ``top − code · step`` is within ``step / 2`` of its value (plus float32 rounding).

    Examples:
        >>> top, step, codes = quantise(torch.tensor([[3.0, 1.0, 0.0]]), value_bits=2)
        >>> top, step, codes
        (array([3.], dtype=float32), array([1.], dtype=float32), array([[0, 2, 3]]))
    """
    exact = values.double().numpy()
    top = exact[..., 0].astype(np.float32)
    step = ((exact[..., 0] - exact[..., -1]) / (2**value_bits - 1)).astype(np.float32)
    safe = np.where(step > 0, step, 1.0).astype(np.float64)[..., None]
    codes = np.rint((top.astype(np.float64)[..., None] - exact) / safe)
    return top, step, np.clip(codes, 0, 2**value_bits - 1).astype(np.int64)


def encode_rows(logits: Tensor, top_k: int, value_bits: int | None) -> np.ndarray:
    """The row records (see :func:`row_dtype`) of one teacher's logits ``(..., V)``.

    Examples:
        >>> logits = torch.tensor([[0.5, 3.0, -1.0, 2.0, 0.0]])
        >>> rows = encode_rows(logits, top_k=2, value_bits=None)
        >>> decode_ids(rows["ids"], 2, 5), rows["values"]
        (array([[1, 3]]), array([[3., 2.]], dtype=float32))
    """
    vocab_size = logits.shape[-1]
    packed = compress_topk(logits, top_k)  # on the logits' device; values decreasing
    values = packed.values.cpu()
    ids, order = packed.indices.long().cpu().sort(dim=-1)
    rows = np.empty(logits.shape[:-1], dtype=row_dtype(vocab_size, top_k, value_bits))
    rows["ids"] = encode_ids(ids.numpy(), vocab_size)
    rows["tail"] = packed.tail_logsumexp.cpu().numpy()
    if value_bits is None:
        rows["values"] = values.gather(-1, order).numpy()
        return rows
    top, step, codes = quantise(values, value_bits)
    rows["top"], rows["step"] = top, step
    rows["codes"] = pack_bits(np.take_along_axis(codes, order.numpy(), axis=-1), value_bits)
    return rows
