"""Real text without a network: the Python standard library's sources (or your own files),
tokenised, packed into fixed-length blocks of next-token targets."""

from __future__ import annotations

import glob
import hashlib
import math
import os
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from kd_lightning.data.base import SplitDataModule
from kd_lightning.data.tokenizers import (
    ByteTokenizer,
    TextTokenizer,
    cached_bpe,
    corpus_fingerprint,
    write_atomically,
)
from kd_lightning.models.checks import check_positive

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")
STDLIB_SKIPPED_DIRS = frozenset({"site-packages", "test", "tests", "idle_test", "__pycache__"})
"""Directories of the standard library left out of the default corpus: installed packages, and
the test suites (20 MB of regression tests, which would outweigh the library's own 12 MB of code
and hold deliberately malformed files: bad encodings, syntax errors, Python 2 sources)."""


def default_cache_dir() -> Path:
    """``$KD_LIGHTNING_CACHE/text``, or ``~/.cache/kd_lightning/text`` (as ``conf/paths``).

    Examples:
        >>> default_cache_dir().name
        'text'
    """
    root = os.environ.get("KD_LIGHTNING_CACHE") or Path.home() / ".cache" / "kd_lightning"
    return Path(root) / "text"


def split_of(name: str, val_fraction: float, test_fraction: float) -> Split:
    """The split of the document at relative path ``name``, from a hash of that path alone.

    ``u``, the SHA-256 of ``name`` read as a number in ``[0, 1)``: validation when ``u < val_fraction``,
    test when ``u < val_fraction + test_fraction``, training otherwise. So a file's split never
    depends on the order or the number of the other files, and files added to a corpus leave the
    others where they were.

    Examples:
        >>> split_of("json/decoder.py", 0.05, 0.05), split_of("json/decoder.py", 0.0, 0.0)
        ('train', 'train')
        >>> [split_of(f"file{i}.py", 0.3, 0.3) for i in range(5)]
        ['train', 'val', 'test', 'val', 'test']
    """
    return _split_of(_unit_hash("split", name), val_fraction, test_fraction)


def _split_of(unit: float, val_fraction: float, test_fraction: float) -> Split:
    if unit < val_fraction:
        return "val"
    return "test" if unit < val_fraction + test_fraction else "train"


def _unit_hash(salt: str, name: str) -> float:
    """``sha256(salt, name)`` as a number in ``[0, 1)``."""
    digest = hashlib.sha256(f"{salt}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass(frozen=True)
class TextFile:
    """One document of the corpus.

    Attributes:
        path: Where it is.
        name: Its path relative to the corpus root, POSIX style: the key of its split.
        split: ``"train"``, ``"val"`` or ``"test"``.
        limit: How many of its bytes are read; ``None`` for all.
    """

    path: Path
    name: str
    split: Split
    limit: int | None = None

    def read(self) -> str:
        """The text (invalid UTF-8 replaced; a character cut by ``limit`` dropped)."""
        data = self.path.read_bytes()
        if self.limit is not None and self.limit < len(data):
            return data[: self.limit].decode("utf-8", errors="ignore")
        return data.decode("utf-8", errors="replace")


class PackedBlocks(Dataset[dict[str, Tensor]]):
    """Windows of ``block_size + 1`` tokens of one token stream, ``block_size`` apart.

    Block ``i`` covers tokens ``[i·b, i·b + b + 1)``: ``input_ids`` are its first ``b``,
    ``labels`` its last ``b`` (the next token of each input), and the next block starts at this
    block's last label, so every token but the first is a target exactly once. A leftover shorter
    than a block is dropped. ``attention_mask`` is all ones (blocks hold no padding). With
    ``route_ids=K`` each block also carries ``teacher_id = i mod K``, a round-robin teacher per
    sequence for ``fusion=routed`` (what a ``teacher_id`` column of TRL's trainers assigns).

    Examples:
        >>> blocks = PackedBlocks(np.arange(10), block_size=4)
        >>> len(blocks), blocks[1]["input_ids"].tolist(), blocks[1]["labels"].tolist()
        (2, [4, 5, 6, 7], [5, 6, 7, 8])
        >>> PackedBlocks(np.arange(10), block_size=4, route_ids=3)[1]["teacher_id"]
        tensor(1)
    """

    def __init__(self, tokens: np.ndarray, block_size: int, route_ids: int | None = None) -> None:
        check_positive(block_size=block_size)
        if route_ids is not None:
            check_positive(route_ids=route_ids)
        self.tokens = tokens
        self.block_size = block_size
        self.route_ids = route_ids

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.block_size)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"block {index} out of range for {len(self)} blocks")
        start = index * self.block_size
        window = np.asarray(self.tokens[start : start + self.block_size + 1], dtype=np.int64)
        tokens = torch.from_numpy(window)
        block = {
            "input_ids": tokens[:-1],
            "attention_mask": torch.ones(self.block_size, dtype=torch.long),
            "labels": tokens[1:],
        }
        if self.route_ids is not None:
            block["teacher_id"] = torch.tensor(index % self.route_ids)
        return block


class TextDataModule(SplitDataModule[PackedBlocks]):
    """Language-modelling batches from local text: the standard library's sources by default.

    **Corpus.** Without ``paths``, the ``*.py`` files of the running interpreter's standard
    library (``sysconfig.get_paths()["stdlib"]``, about 730 files, 12 MB), leaving out
    :data:`STDLIB_SKIPPED_DIRS` (``site-packages`` and the test suites). With ``paths``, your
    files: each item a file, a directory (its files matching ``pattern``, recursively) or a glob
    (``"notes/**/*.md"``).

    **Splits.** By file, from a hash of each file's path relative to ``root``
    (:func:`split_of`): deterministic, and independent of the order and the number of files.
    ``max_files`` and ``max_bytes`` take a slice for tests and small machines, shared among the
    splits in proportion to their fractions: each split reads its files in a fixed pseudo-random
    order (another hash of the path) until it has ``⌈max_files · fraction⌉`` files (rounded up,
    so that every split with a positive fraction gets one) or ``⌊max_bytes · fraction⌋`` bytes,
    the last file cut short.

    **Tokens.** ``tokenizer="byte"`` (:class:`~kd_lightning.data.tokenizers.ByteTokenizer`,
    ``V = 258``), ``"bpe"`` (a byte-level BPE of ``vocab_size`` trained on the training split
    only, cached under ``cache_dir``; :func:`~kd_lightning.data.tokenizers.cached_bpe`), or a
    tokenizer object (:class:`~kd_lightning.data.tokenizers.TextTokenizer`). Each split's
    documents are concatenated, each followed by ``<|endoftext|>`` (attention crosses documents,
    as in GPT-2's packing), and the token stream is cached under ``cache_dir`` as an ``.npy``
    (read memory-mapped), keyed by the tokenizer and the split's files (paths, sizes,
    modification times, limits), written atomically.

    **Batches.** :class:`PackedBlocks`: dicts ``{"input_ids", "attention_mask", "labels"}`` of
    shape ``(batch_size, block_size)``, int64, with ``labels`` already the next tokens (unlike
    Hugging Face causal LMs, which shift inside the model): logits ``(B, L, V)`` of a
    :class:`~kd_lightning.models.causal_lm.CausalLM` on ``input_ids`` pair position by position
    with ``labels`` in :class:`~kd_lightning.DistillationLoss`. A
    :class:`~kd_lightning.DistillationModule` reads them with
    ``BatchAdapter(input_key="input_ids", target_key="labels")``.

    Args:
        paths: Files, directories or globs; ``None`` for the standard library.
        tokenizer: ``"byte"``, ``"bpe"`` or a tokenizer object.
        vocab_size: The BPE's largest vocabulary (``"bpe"`` only).
        block_size: Tokens per sequence ``L``.
        batch_size: Sequences per batch.
        val_fraction: Expected share of files in the validation split.
        test_fraction: Expected share of files in the test split.
        max_bytes: Read at most this many bytes in all; ``None`` for no limit.
        max_files: Read about this many files in all (each split's share rounded up); ``None``
            for no limit.
        root: The directory the split keys are relative to; default: the standard library, or
            the deepest directory holding every file of ``paths``.
        pattern: The files taken from a directory of ``paths``.
        cache_dir: Where tokenizers and token streams are cached; default
            :func:`default_cache_dir`.
        num_workers: Dataloader worker processes.
        route_ids: Give each block a ``teacher_id`` field, round robin over this many teachers
            (:class:`PackedBlocks`); ``None`` for none.

    Examples:
        >>> import tempfile
        >>> temporary = tempfile.TemporaryDirectory()
        >>> folder = temporary.name
        >>> for i in range(12):
        ...     _ = Path(folder, f"doc{i}.txt").write_text(f"document {i}: " + "abc " * 40)
        >>> dm = TextDataModule(
        ...     paths=folder, pattern="*.txt", block_size=16, batch_size=4,
        ...     val_fraction=0.25, test_fraction=0.25, cache_dir=Path(folder, "cache"),
        ... )
        >>> dm.setup()
        >>> [file.name for file in dm.files if file.split == "val"]
        ['doc1.txt', 'doc11.txt', 'doc2.txt']
        >>> batch = next(iter(dm.train_dataloader()))
        >>> {key: tuple(value.shape) for key, value in batch.items()}
        {'input_ids': (4, 16), 'attention_mask': (4, 16), 'labels': (4, 16)}
        >>> dm.tokenizer.decode(dm.val_set[0]["input_ids"].tolist())
        'document 1: abc '
        >>> temporary.cleanup()
    """

    def __init__(
        self,
        paths: str | Path | Sequence[str | Path] | None = None,
        tokenizer: Literal["byte", "bpe"] | TextTokenizer = "byte",
        vocab_size: int = 8192,
        block_size: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        max_bytes: int | None = None,
        max_files: int | None = None,
        root: str | Path | None = None,
        pattern: str = "*.py",
        cache_dir: str | Path | None = None,
        num_workers: int = 0,
        route_ids: int | None = None,
    ) -> None:
        check_positive(vocab_size=vocab_size, block_size=block_size, batch_size=batch_size)
        for name, limit in (
            ("max_bytes", max_bytes),
            ("max_files", max_files),
            ("route_ids", route_ids),
        ):
            if limit is not None:
                check_positive(**{name: limit})
        for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= fraction < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {fraction}")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction={val_fraction} and test_fraction={test_fraction} leave no "
                f"training files"
            )
        if isinstance(tokenizer, str) and tokenizer not in ("byte", "bpe"):
            raise ValueError(f"tokenizer must be 'byte', 'bpe' or a tokenizer, got {tokenizer!r}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be non-negative, got {num_workers}")
        super().__init__(batch_size, num_workers)
        self.save_hyperparameters(ignore=[] if isinstance(tokenizer, str) else ["tokenizer"])
        self.paths = paths
        self.tokenizer_kind = tokenizer
        self.requested_vocab_size = vocab_size
        self.block_size = block_size
        self.route_ids = route_ids
        self.fractions: dict[Split, float] = {
            "train": 1.0 - val_fraction - test_fraction,
            "val": val_fraction,
            "test": test_fraction,
        }
        self.max_bytes = max_bytes
        self.max_files = max_files
        self.root = root
        self.pattern = pattern
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._files: list[TextFile] | None = None
        self._tokenizer: TextTokenizer | None = None if isinstance(tokenizer, str) else tokenizer

    @property
    def vocab_size(self) -> int:
        """The width of a model's output: 258 for bytes, ``vocab_size`` for the BPE (its ids
        stay below it; a small corpus may give fewer), a tokenizer object's own size."""
        if self.tokenizer_kind == "byte":
            return ByteTokenizer.vocab_size
        if self.tokenizer_kind == "bpe":
            return self.requested_vocab_size
        return self.tokenizer.vocab_size

    @property
    def files(self) -> list[TextFile]:
        """The documents read, with their split and byte limit, ordered by split then name."""
        if self._files is None:
            self._files = self._select(self._discover())
        return self._files

    @property
    def tokenizer(self) -> TextTokenizer:
        """The tokenizer (a BPE is trained, or read from the cache, on first use)."""
        if self._tokenizer is None:
            if self.tokenizer_kind == "bpe":
                train = [file for file in self.files if file.split == "train"]
                self._tokenizer = cached_bpe(
                    lambda: (file.read() for file in train),
                    corpus_fingerprint((file.path, file.limit) for file in train),
                    self.requested_vocab_size,
                    self.cache_dir,
                )
            else:
                self._tokenizer = ByteTokenizer()
        return self._tokenizer

    def prepare_data(self) -> None:
        """Train or load the tokenizer and tokenise every split into the cache."""
        for split in SPLITS:
            self.tokens(split)

    def tokens(self, split: Split) -> np.ndarray:
        """The token stream of ``split``, memory-mapped from the cache (built on a miss)."""
        files = [file for file in self.files if file.split == split]
        tokenizer = self.tokenizer
        corpus = corpus_fingerprint((file.path, file.limit) for file in files)
        key = hashlib.sha256(f"{tokenizer.fingerprint}\0{corpus}".encode()).hexdigest()[:16]
        path = self.cache_dir / f"tokens-{split}-{key}.npy"
        if not path.exists():
            stream = _token_stream(tokenizer, files)
            write_atomically(path, lambda file: np.save(file, stream))
        return np.load(path, mmap_mode="r")

    def build_splits(self) -> tuple[PackedBlocks, PackedBlocks, PackedBlocks]:
        """The packed blocks of each split; a split with a positive fraction must get some."""
        sets = {
            split: PackedBlocks(self.tokens(split), self.block_size, self.route_ids)
            for split in SPLITS
        }
        for split, blocks in sets.items():
            if self.fractions[split] > 0 and not len(blocks):
                count = sum(file.split == split for file in self.files)
                raise ValueError(
                    f"the {split} split got no block of {self.block_size + 1} tokens from its "
                    f"{count} files: add files, raise max_bytes or max_files, lower block_size, "
                    f"or set its fraction to 0"
                )
        return sets["train"], sets["val"], sets["test"]

    def _discover(self) -> list[TextFile]:
        """Every file of the corpus, keyed by its path relative to the root, with its split."""
        if self.paths is None:
            root = Path(self.root or sysconfig.get_paths()["stdlib"])
            found = sorted(_walk(root, "*.py", STDLIB_SKIPPED_DIRS))
        else:
            found = _expand(self.paths, self.pattern)
            root = Path(self.root) if self.root is not None else _common_dir(found)
        if not found:
            raise ValueError(f"no text file found in paths={self.paths!r}")
        files = []
        for path in found:
            try:
                name = path.resolve().relative_to(root.resolve()).as_posix()
            except ValueError:
                raise ValueError(f"{path} is not under root={str(root)!r}") from None
            split = split_of(name, self.fractions["val"], self.fractions["test"])
            files.append(TextFile(path=path, name=name, split=split))
        return files

    def _select(self, files: list[TextFile]) -> list[TextFile]:
        """Each split's share of ``max_files`` and ``max_bytes``, in a fixed pseudo-random order."""
        chosen = []
        for split in SPLITS:
            fraction = self.fractions[split]
            members = sorted(
                (file for file in files if file.split == split),
                key=lambda file: (_unit_hash("order", file.name), file.name),
            )
            if self.max_files is not None:  # (rounded first: 10 * 0.6 is 6.000000000000001)
                members = members[: math.ceil(round(self.max_files * fraction, 9))]
            if self.max_bytes is None:
                chosen.extend(sorted(members, key=lambda file: file.name))
                continue
            budget = math.floor(round(self.max_bytes * fraction, 9))
            taken = []
            for file in members:
                if budget <= 0:
                    break
                size = file.path.stat().st_size
                limit = None if size <= budget else budget
                taken.append(TextFile(file.path, file.name, file.split, limit))
                budget -= size
            chosen.extend(sorted(taken, key=lambda file: file.name))
        return chosen

    def __repr__(self) -> str:
        return (
            f"TextDataModule(paths={self.paths!r}, tokenizer={self.tokenizer_kind!r}, "
            f"vocab_size={self.vocab_size}, block_size={self.block_size})"
        )


def _token_stream(tokenizer: TextTokenizer, files: Sequence[TextFile]) -> np.ndarray:
    """The documents' tokens, each document followed by ``<|endoftext|>``; the smallest
    unsigned dtype that holds the vocabulary."""
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    pieces: list[np.ndarray] = []
    for batch in _batches(files, 64):
        for ids in tokenizer.encode_batch([file.read() for file in batch]):
            pieces += [ids.astype(dtype), eos]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


def _batches(files: Sequence[TextFile], size: int) -> Iterator[Sequence[TextFile]]:
    for start in range(0, len(files), size):
        yield files[start : start + size]


def _walk(root: Path, pattern: str, skipped: frozenset[str] = frozenset()) -> Iterator[Path]:
    """The files under ``root`` matching ``pattern``, not descending into ``skipped`` dirs."""
    for folder, dirs, names in os.walk(root):
        dirs[:] = [name for name in dirs if name not in skipped]
        for name in names:
            path = Path(folder, name)
            if path.match(pattern):
                yield path


def _expand(paths: str | Path | Sequence[str | Path], pattern: str) -> list[Path]:
    """Files, directories (their files matching ``pattern``) and globs, to distinct files."""
    items = [paths] if isinstance(paths, str | Path) else list(paths)
    found: dict[Path, Path] = {}
    for item in items:
        if isinstance(item, str) and glob.has_magic(item):
            matches = [Path(match) for match in sorted(glob.glob(item, recursive=True))]
            matches = [match for match in matches if match.is_file()]
        elif Path(item).is_dir():
            matches = sorted(_walk(Path(item), pattern))
        elif Path(item).is_file():
            matches = [Path(item)]
        else:
            raise ValueError(f"paths: {str(item)!r} is no file, directory or matching glob")
        if not matches:
            raise ValueError(f"paths: {str(item)!r} matches no file (directories: {pattern!r})")
        for match in matches:
            found.setdefault(match.resolve(), match)
    return sorted(found.values())


def _common_dir(files: Sequence[Path]) -> Path:
    """The deepest directory holding every file."""
    return Path(os.path.commonpath([str(file.resolve().parent) for file in files]))
