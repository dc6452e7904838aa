"""Tokenizers for text corpora: raw UTF-8 bytes, or a byte-level BPE trained locally and cached.

Both map any text to ids without unknown tokens and reserve two special tokens,
``<|endoftext|>`` (the separator of packed documents) and ``<|pad|>``. Nothing is downloaded: the
BPE is trained on the corpus with Hugging Face ``tokenizers`` and cached on disk under a key of
the corpus's files, the vocabulary size and the kind.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    import tokenizers

SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")
"""The special tokens of both tokenizers: the end of a document, and padding."""


class TextTokenizer(Protocol):
    """What :class:`~kd_lightning.data.text.TextDataModule` needs of a tokenizer.

    ``fingerprint`` identifies the mapping (two tokenizers with the same fingerprint give the same
    ids), so token ids cached under it stay valid.
    """

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def fingerprint(self) -> str: ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids ``0..255``, then ``<|endoftext|>`` = 256 and ``<|pad|>`` = 257.

    The tokenizer of byte-level language models (e.g. ByT5, Xue et al. 2022): no training, no
    unknown token, ``V = 258``; a text of ``n`` UTF-8 bytes is ``n`` tokens.

    Examples:
        >>> tokenizer = ByteTokenizer()
        >>> tokenizer.encode("hé"), tokenizer.vocab_size
        ([104, 195, 169], 258)
        >>> tokenizer.decode([104, 195, 169, tokenizer.eos_id])
        'hé'
    """

    vocab_size = 256 + len(SPECIAL_TOKENS)
    eos_id = 256
    pad_id = 257
    fingerprint = "byte-utf8"

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text``."""
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Each text's bytes as a ``uint8`` array."""
        return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of the byte ids, special tokens dropped, invalid UTF-8 replaced."""
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class BPETokenizer:
    """Byte-level BPE (Sennrich et al. 2016; byte-level as in GPT-2, Radford et al. 2019).

    Wraps a Hugging Face ``tokenizers.Tokenizer`` with a ``ByteLevel`` pre-tokenizer and decoder:
    every byte is in the initial alphabet, so no text has an unknown token. Ids 0 and 1 are
    ``<|endoftext|>`` and ``<|pad|>``. Train one with :meth:`train`, or train-or-load a cached one
    with :func:`cached_bpe`.

    Examples:
        >>> texts = ["def add(a, b):\\n    return a + b\\n"] * 20
        >>> tokenizer = BPETokenizer.train(texts, vocab_size=300)
        >>> ids = tokenizer.encode("def add(a, b):")
        >>> tokenizer.decode(ids), len(ids) < len("def add(a, b):")
        ('def add(a, b):', True)
        >>> tokenizer.eos_id, tokenizer.vocab_size <= 300
        (0, True)
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer) -> None:
        eos, pad = (tokenizer.token_to_id(token) for token in SPECIAL_TOKENS)
        if eos is None or pad is None:
            raise ValueError(f"the tokenizer lacks a special token of {SPECIAL_TOKENS}")
        self.tokenizer = tokenizer
        self._eos_id, self._pad_id = int(eos), int(pad)
        self._fingerprint = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8192) -> BPETokenizer:
        """Learn ``vocab_size − 258`` merges on ``texts`` (fewer if the texts run out of pairs).

        Args:
            texts: The training documents.
            vocab_size: The largest vocabulary, specials and the 256 bytes included; ``≥ 258``.
        """
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(
                f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (the 256 bytes and "
                f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size}"
            )
        hf = _import_tokenizers()
        tokenizer = hf.Tokenizer(hf.models.BPE())
        tokenizer.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = hf.decoders.ByteLevel()
        trainer = hf.trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer)
        return cls(tokenizer)

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        """Load a tokenizer saved by :meth:`save`."""
        return cls(_import_tokenizers().Tokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> None:
        """Write the tokenizer's JSON to ``path`` atomically."""
        data = self.tokenizer.to_str().encode()
        write_atomically(Path(path), lambda file: file.write(data))

    @property
    def vocab_size(self) -> int:
        """The number of ids, specials included."""
        return int(self.tokenizer.get_vocab_size())

    @property
    def eos_id(self) -> int:
        """The id of ``<|endoftext|>``."""
        return self._eos_id

    @property
    def pad_id(self) -> int:
        """The id of ``<|pad|>``."""
        return self._pad_id

    @property
    def fingerprint(self) -> str:
        """A hash of the tokenizer's JSON: its vocabulary, merges and settings."""
        return self._fingerprint

    def encode(self, text: str) -> list[int]:
        """The ids of ``text``."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Each text's ids as an ``int32`` array (encoded in parallel)."""
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(encoding.ids, dtype=np.int32) for encoding in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``, special tokens dropped."""
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint!r})"


def cached_bpe(
    texts: Callable[[], Iterable[str]], corpus_key: str, vocab_size: int, cache_dir: str | Path
) -> BPETokenizer:
    """The BPE of ``vocab_size`` trained on ``texts()``, from the cache when it is there.

    The file is ``cache_dir/bpe-{vocab_size}-{key}.json`` with ``key`` a hash of the kind,
    ``vocab_size`` and ``corpus_key`` (e.g. :func:`corpus_fingerprint` of the training files);
    it is written atomically, so concurrent builders (DDP ranks) never see half a file.

    Args:
        texts: Called only on a cache miss; yields the training documents.
        corpus_key: Identifies the training corpus.
        vocab_size: The largest vocabulary.
        cache_dir: Where the tokenizer is kept.

    Examples:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as cache:
        ...     first = cached_bpe(lambda: ["a b a b c"] * 9, "demo", 260, cache)
        ...     again = cached_bpe(lambda: [], "demo", 260, cache)  # read back, not trained
        >>> first.fingerprint == again.fingerprint
        True
    """
    key = hashlib.sha256(f"bpe\0{vocab_size}\0{corpus_key}".encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"bpe-{vocab_size}-{key}.json"
    if path.exists():
        return BPETokenizer.from_file(path)
    tokenizer = BPETokenizer.train(texts(), vocab_size)
    tokenizer.save(path)
    return tokenizer


def corpus_fingerprint(files: Iterable[tuple[str | Path, int | None]]) -> str:
    """A hash of a corpus: each file's resolved path, size, modification time and how many of its
    bytes are read (``None``: all), in the order given.

    Examples:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile() as file:
        ...     whole = corpus_fingerprint([(file.name, None)])
        ...     head = corpus_fingerprint([(file.name, 10)])
        >>> len(whole), whole != head
        (64, True)
    """
    digest = hashlib.sha256()
    for path, limit in files:
        stat = Path(path).stat()
        line = f"{Path(path).resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{limit}\n"
        digest.update(line.encode())
    return digest.hexdigest()


def write_atomically(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write`` on a temporary file beside ``path``, then move it onto ``path``
    (``os.replace``), so readers see the old file or the whole new one.

    Examples:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     write_atomically(Path(folder) / "a" / "b.txt", lambda file: file.write(b"hi"))
        ...     (Path(folder) / "a" / "b.txt").read_text()
        'hi'
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            write(file)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _import_tokenizers() -> Any:
    """Hugging Face ``tokenizers``, imported when a BPE is first needed (the byte tokenizer and
    the rest of ``kd_lightning.data`` work without it)."""
    try:
        import tokenizers
    except ImportError as error:
        raise ImportError(
            "the BPE tokenizer needs Hugging Face `tokenizers`: pip install tokenizers"
        ) from error
    return tokenizers
